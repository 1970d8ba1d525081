package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// extraSidecar runs one more sidecar for id beside the mesh, with store as
// its certificate, routing with the mesh's map and endpoints. It makes no
// retry, so that a refused peer shows as "unreachable" at once.
func (m *mesh) extraSidecar(id Identity, store *meshtls.Store, eps []Endpoint) *node {
	t := m.t
	t.Helper()
	n := &node{id: id, reg: prometheus.NewRegistry(), logs: &syncBuffer{}}
	sc, err := New(Config{
		Identity: id, App: freeAddr(t), TLS: store,
		Outbound: "127.0.0.1:0", InboundQUIC: "127.0.0.1:0", Admin: Off,
		Logger:   slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry: n.reg, Retries: -1, DrainTimeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Listen(); err != nil {
		t.Fatal(err)
	}
	if err := sc.SetMap(compile(t, m.topo)); err != nil {
		t.Fatal(err)
	}
	if eps == nil {
		eps = m.endpoints()
	}
	if err := sc.SetEndpoints(eps, 1); err != nil {
		t.Fatal(err)
	}
	n.sc, n.addrs = sc, sc.Addrs()
	ctx, cancel := context.WithCancel(context.Background())
	n.stop, n.done = cancel, make(chan error, 1)
	go func() { n.done <- sc.Run(ctx) }()
	t.Cleanup(func() { n.shutdown(t) })
	waitFor(t, 5*time.Second, sc.Ready, "the extra sidecar ready")
	return n
}

// getVia sends a GET for uid through n's outbound listener.
func getVia(t *testing.T, n *node, uid string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+n.addrs.Outbound+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	return do(t, &http.Client{Timeout: 10 * time.Second}, req)
}

// writeStore writes a certificate and key, and a bundle of the given CAs,
// and loads them with the clock now (nil: time.Now).
func writeStore(t *testing.T, cert, key []byte, cas [][]byte, now func() time.Time) *meshtls.Store {
	t.Helper()
	dir := t.TempDir()
	f := meshtls.Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "cert.pem"), Key: filepath.Join(dir, "key.pem")}
	var bundle []byte
	for _, ca := range cas {
		bundle = append(bundle, ca...)
	}
	for p, b := range map[string][]byte{f.CA: bundle, f.Cert: cert, f.Key: key} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	st, err := meshtls.Load(f, now)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func tlsRejected(n *node, direction, reason string) float64 {
	return testutil.ToFloat64(n.sc.m.tlsRejected.WithLabelValues(direction, reason))
}

func meshID(id Identity) meshtls.ID {
	return meshtls.ID{TrustDomain: trustDomain, Region: id.Region, Unit: id.Unit, Service: id.Service}
}

// refusedByPeer checks the sender's answer when the peer refused the
// sender's own certificate: 503 unreachable.
func refusedByPeer(t *testing.T, resp *http.Response, body []byte) {
	t.Helper()
	wantSidecarError(t, resp, body, http.StatusServiceUnavailable, "unreachable")
}

// A sidecar whose certificate comes from another CA is refused by its
// peers, over QUIC and over HTTP/2.
func TestForeignCARefused(t *testing.T) {
	m := newMesh(t, meshOpts{})
	foreign := newTestCA(t, trustDomain)
	id := Identity{Region: "us-east", Unit: "us-east-1", Service: "echo"}
	cert, key, err := meshtls.Issue(foreign.cert, foreign.key, meshID(id), []string{"127.0.0.1"}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// It trusts both CAs, so that it accepts the mesh's servers: only the
	// peer's check of its own certificate can refuse it.
	evil := m.extraSidecar(id, writeStore(t, cert, key, [][]byte{foreign.cert, m.ca.cert}, nil), nil)
	target := m.nodes["eu-west-1"]

	for _, transport := range []Transport{QUIC, H2} {
		t.Run(string(transport), func(t *testing.T) {
			var h2Units []string
			if transport == H2 {
				h2Units = []string{"eu-west-1"}
			}
			if err := evil.sc.SetEndpoints(m.endpoints(h2Units...), 2); err != nil {
				t.Fatal(err)
			}
			before := tlsRejected(target, "inbound", "unknown-ca")
			resp, body := getVia(t, evil, uidEUWest1)
			waitFor(t, 5*time.Second, func() bool { return tlsRejected(target, "inbound", "unknown-ca") >= before+1 },
				`cellmesh_tls_rejected_total{direction="inbound",reason="unknown-ca"} to rise by 1 at eu-west-1`)
			waitFor(t, 5*time.Second, func() bool { return target.logs.contains("peer certificate refused") },
				"eu-west-1 to log the refused certificate")
			if got := requestCount(t, target, "inbound"); got != 0 {
				t.Errorf("eu-west-1 handled %v inbound requests, want none", got)
			}
			refusedByPeer(t, resp, body)
		})
	}
}

// An endpoint whose certificate names another unit than the endpoint list
// does is refused by the sender.
func TestWrongPeerIdentityRefused(t *testing.T) {
	m := newMesh(t, meshOpts{})
	var eps []Endpoint
	for _, ep := range m.endpoints() {
		switch ep.Unit {
		case "us-east-1":
			continue
		case "us-east-2":
			ep.Address = m.nodes["us-east-1"].addrs.InboundQUIC // us-east-1 listed as us-east-2
		}
		eps = append(eps, ep)
	}
	id := Identity{Region: "eu-west", Unit: "eu-west-1", Service: "echo"}
	sender := m.extraSidecar(id, m.ca.issue(meshID(id), time.Hour, nil), eps)

	resp, body := getVia(t, sender, uidUSEast2)
	wantSidecarError(t, resp, body, http.StatusServiceUnavailable, "unreachable")
	if !strings.Contains(string(body), "us-east-2") {
		t.Errorf("body does not name the unit: %q", body)
	}
	if got := tlsRejected(sender, "outbound", "unauthorized"); got < 1 {
		t.Errorf(`cellmesh_tls_rejected_total{direction="outbound",reason="unauthorized"} = %v, want at least 1`, got)
	}
	if got := requestCount(t, m.nodes["us-east-1"], "inbound"); got != 0 {
		t.Errorf("us-east-1 handled %v inbound requests, want none", got)
	}
	// The endpoints that are what they claim still answer.
	resp, body = getVia(t, sender, uidEUWest2)
	if resp.StatusCode != http.StatusOK || decodeEcho(t, body).Unit != "eu-west-2" {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
}

// A peer with an expired certificate is refused, with reason expired.
func TestExpiredCertificateRefused(t *testing.T) {
	m := newMesh(t, meshOpts{})
	past := time.Now().Add(-5 * time.Hour)
	oldCA, oldKey, err := meshtls.NewCA(trustDomain, 48*time.Hour, past.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	id := Identity{Region: "us-east", Unit: "us-east-1", Service: "echo"}
	cert, key, err := meshtls.Issue(oldCA, oldKey, meshID(id), []string{"127.0.0.1"}, time.Hour, past)
	if err != nil {
		t.Fatal(err)
	}
	// Load checks the certificate at a time it was valid; then the clock
	// is the real one, for the handshakes.
	var loaded atomic.Bool
	clock := func() time.Time {
		if loaded.Load() {
			return time.Now()
		}
		return past.Add(time.Minute)
	}
	store := writeStore(t, cert, key, [][]byte{oldCA, m.ca.cert}, clock)
	loaded.Store(true)
	if !store.NotAfter().Before(time.Now()) {
		t.Fatalf("the certificate is valid until %s: not expired", store.NotAfter())
	}
	evil := m.extraSidecar(id, store, nil)
	target := m.nodes["eu-west-1"]

	resp, body := getVia(t, evil, uidEUWest1)
	// >= 1: quic-go's HTTP/3 client may dial once more on a refused connection.
	waitFor(t, 5*time.Second, func() bool { return tlsRejected(target, "inbound", "expired") >= 1 },
		`cellmesh_tls_rejected_total{direction="inbound",reason="expired"} >= 1 at eu-west-1`)
	if !target.logs.contains("reason=expired") {
		t.Errorf("eu-west-1 did not log the reason: %s", target.logs.String())
	}
	if got := requestCount(t, target, "inbound"); got != 0 {
		t.Errorf("eu-west-1 handled %v inbound requests, want none", got)
	}
	refusedByPeer(t, resp, body)
}

// rawClients are an HTTP/3 and an HTTP/2 client that present store's
// certificate to a sidecar's inbound listeners directly.
func rawClients(t *testing.T, store *meshtls.Store) (h3, h2 *http.Client) {
	t.Helper()
	h3tr := &http3.Transport{TLSClientConfig: store.ClientConfig(nil, nil)}
	t.Cleanup(func() { h3tr.Close() })
	tc := store.ClientConfig(nil, nil)
	tc.NextProtos = []string{"h2"}
	p := new(http.Protocols)
	p.SetHTTP2(true)
	h2tr := &http.Transport{TLSClientConfig: tc, Protocols: p}
	t.Cleanup(h2tr.CloseIdleConnections)
	return &http.Client{Timeout: 10 * time.Second, Transport: h3tr}, &http.Client{Timeout: 10 * time.Second, Transport: h2tr}
}

// A peer of a unit the topology does not have is refused on both inbound
// listeners, though its certificate is from the mesh CA.
func TestUnknownUnitRefused(t *testing.T) {
	m := newMesh(t, meshOpts{})
	target := m.nodes["eu-west-1"]
	urls := map[string]string{"quic": "https://" + target.addrs.InboundQUIC + "/", "h2": "https://" + target.addrs.InboundTCP + "/"}

	// A known unit's certificate gets through, so the clients are right.
	good3, good2 := rawClients(t, m.ca.issue(meshID(m.nodes["us-east-2"].id), time.Hour, nil))
	for name, c := range map[string]*http.Client{"quic": good3, "h2": good2} {
		req, _ := http.NewRequest("GET", urls[name], nil)
		req.Host = "echo"
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK || decodeEcho(t, body).Unit != "eu-west-1" {
			t.Fatalf("%s with a known unit: status %d: %s", name, resp.StatusCode, body)
		}
	}

	bad3, bad2 := rawClients(t, m.ca.issue(meshtls.ID{TrustDomain: trustDomain, Region: "us-west", Unit: "us-west-9", Service: "echo"}, time.Hour, nil))
	for name, c := range map[string]*http.Client{"quic": bad3, "h2": bad2} {
		before := tlsRejected(target, "inbound", "unauthorized")
		req, _ := http.NewRequest("GET", urls[name], nil)
		req.Host = "echo"
		resp, err := c.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Errorf("%s: unit us-west-9 got status %d, want a refused handshake: %s", name, resp.StatusCode, body)
			continue
		}
		waitFor(t, 5*time.Second, func() bool { return tlsRejected(target, "inbound", "unauthorized") >= before+1 },
			name+`: cellmesh_tls_rejected_total{direction="inbound",reason="unauthorized"} to rise`)
	}
	if !target.logs.contains("unit us-west-9 is not in topology") {
		t.Errorf("eu-west-1 did not log why us-west-9 was refused: %s", target.logs.String())
	}
	if got := requestCount(t, target, "inbound"); got != 2 {
		t.Errorf("eu-west-1 handled %v inbound requests, want the 2 of the known unit", got)
	}
}

// A reloaded certificate is presented to new connections while the
// established ones go on.
func TestCertificateRotation(t *testing.T) {
	m := newMesh(t, meshOpts{})
	b := m.nodes["eu-west-1"]
	store := b.sc.cfg.TLS
	oldSerial := store.Leaf().SerialNumber

	// A download through us-east-1 -> eu-west-1, started before the reload
	// and paused in the middle.
	const size = 8 << 20
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(m.newReq("GET", "us-east-1", uidEUWest1, "/bytes?n=8388608", nil))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("download: status %d", resp.StatusCode)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}

	cert, key, err := meshtls.Issue(m.ca.cert, m.ca.key, meshID(b.id), []string{"127.0.0.1"}, 2*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	f := store.Files()
	if err := os.WriteFile(f.Key, key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Cert, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := store.Reload(); err != nil {
		t.Fatal(err)
	}
	newSerial := store.Leaf().SerialNumber
	if newSerial.Cmp(oldSerial) == 0 {
		t.Fatal("Reload kept the old certificate")
	}

	n, err := io.Copy(h, resp.Body)
	if err != nil || n != size-(1<<20) {
		t.Fatalf("download after the reload: read %d more bytes, err %v", n, err)
	}
	if got, want := hex.EncodeToString(h.Sum(nil)), resp.Trailer.Get("X-Echo-Sha256"); got != want {
		t.Errorf("download sha256 %s, trailer %q", got, want)
	}

	// New connections see the new certificate, on both listeners.
	client := m.ca.issue(meshID(m.nodes["us-east-2"].id), time.Hour, nil)
	tc := client.ClientConfig(nil, nil)
	tc.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", b.addrs.InboundTCP, tc)
	if err != nil {
		t.Fatal(err)
	}
	if got := conn.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(newSerial) != 0 {
		t.Errorf("inbound_tcp presents serial %x, want the new %x (old %x)", got, newSerial, oldSerial)
	}
	conn.Close()
	qc := client.ClientConfig(nil, nil)
	qc.NextProtos = []string{http3.NextProtoH3}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qconn, err := quic.DialAddr(ctx, b.addrs.InboundQUIC, qc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := qconn.ConnectionState().TLS.PeerCertificates[0].SerialNumber; got.Cmp(newSerial) != 0 {
		t.Errorf("inbound_quic presents serial %x, want the new %x (old %x)", got, newSerial, oldSerial)
	}
	qconn.CloseWithError(0, "")

	// And the mesh goes on: the old connection and a new one.
	for _, from := range []string{"us-east-1", "eu-west-2"} {
		resp, body := m.get(newClient(), from, uidEUWest1, "/")
		if resp.StatusCode != http.StatusOK {
			t.Errorf("from %s after the rotation: status %d: %s", from, resp.StatusCode, body)
		}
	}
	if got := tlsRejected(m.nodes["eu-west-2"], "outbound", "unauthorized") + tlsRejected(m.nodes["eu-west-2"], "outbound", "unknown-ca"); got != 0 {
		t.Errorf("eu-west-2 refused the new certificate %v times", got)
	}
}
