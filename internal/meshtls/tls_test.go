package meshtls

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"
)

// mesh is the material the handshake tests share.
type mesh struct {
	ca, foreign, otherTD ca
	server, client       pair
	serverID, clientID   ID
}

// newMesh makes the material, valid from now on.
func newMesh(t *testing.T, now time.Time) mesh {
	t.Helper()
	m := mesh{
		ca:       newTestCA(t, td, 30*24*time.Hour, now),
		foreign:  newTestCA(t, td, 30*24*time.Hour, now),
		otherTD:  newTestCA(t, "other.test", 30*24*time.Hour, now),
		serverID: testID("u1", "ledger"),
		clientID: testID("u2", "gateway"),
	}
	m.server = m.ca.issue(t, m.serverID, 7*24*time.Hour, now)
	m.client = m.ca.issue(t, m.clientID, 7*24*time.Hour, now)
	return m
}

func TestHandshake(t *testing.T) {
	m := newMesh(t, t0)
	refuseUnit := func(unit string) func(ID) error {
		return func(id ID) error {
			if id.Unit == unit {
				return fmt.Errorf("unit %s may not call", unit)
			}
			return nil
		}
	}
	expectService := func(service string) func(ID) error {
		return func(id ID) error {
			if id.Service != service {
				return fmt.Errorf("want service %s, got %s", service, id.Service)
			}
			return nil
		}
	}
	anon := signCustom(t, m.ca, &x509.Certificate{Subject: pkix.Name{CommonName: "anon"},
		NotBefore: t0.Add(-time.Minute), NotAfter: t0.Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	serverUsageOnly := signCustom(t, m.ca, &x509.Certificate{URIs: []*url.URL{m.clientID.URI()},
		NotBefore: t0.Add(-time.Minute), NotAfter: t0.Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	otherClientID := ID{"other.test", "us-east", "u2", "gateway"}
	otherServerID := ID{"other.test", "us-east", "u1", "ledger"}
	tests := []struct {
		name string
		// Each side is a Store of its bundle and pair, or, when its bundle
		// is nil, a bare crypto/tls peer that presents the pair and
		// verifies nothing: a misconfigured or hostile peer.
		serverBundle []byte
		server       pair
		serverNow    time.Duration // after t0
		authorize    func(ID) error
		clientBundle []byte
		client       pair
		expect       func(ID) error
		// The reason the server refuses the client, or the client the
		// server; "" means accepted.
		serverRefuses, clientRefuses Reason
		wantMsg                      []string // substrings of the refusal
		wantPeer                     string
	}{
		{name: "good", serverBundle: m.ca.cert, server: m.server, clientBundle: m.ca.cert, client: m.client,
			authorize: refuseUnit("u9"), expect: expectService("ledger")},
		{name: "nil-authorize-and-expect", serverBundle: m.ca.cert, server: m.server, clientBundle: m.ca.cert, client: m.client},
		{name: "two-ca-bundle-new-client", serverBundle: bundle(m.ca, m.foreign), server: m.server,
			clientBundle: bundle(m.ca, m.foreign), client: m.foreign.issue(t, m.clientID, time.Hour, t0)},
		{name: "two-ca-bundle-old-client", serverBundle: bundle(m.foreign, m.ca), server: m.server,
			clientBundle: m.ca.cert, client: m.client},
		{name: "client-from-foreign-ca", serverBundle: m.ca.cert, server: m.server,
			client:        m.foreign.issue(t, m.clientID, time.Hour, t0),
			serverRefuses: ReasonUnknownCA, wantMsg: []string{"peer certificate is not signed by a trusted mesh CA: x509: certificate signed by unknown authority"}, wantPeer: m.clientID.String()},
		{name: "client-expired", serverBundle: m.ca.cert, server: m.server, serverNow: 2 * time.Hour,
			client:        m.ca.issue(t, m.clientID, time.Hour, t0),
			serverRefuses: ReasonExpired, wantMsg: []string{"peer certificate expired at 2026-03-01T13:00:00Z: now is 2026-03-01T14:00:00Z"}, wantPeer: m.clientID.String()},
		{name: "client-not-yet-valid", serverBundle: m.ca.cert, server: m.server, serverNow: time.Hour,
			client:        m.ca.issue(t, m.clientID, time.Hour, t0.Add(3*time.Hour)),
			serverRefuses: ReasonExpired, wantMsg: []string{"peer certificate is not valid before 2026-03-01T14:59:00Z: now is 2026-03-01T13:00:00Z"}, wantPeer: m.clientID.String()},
		{name: "client-of-other-trust-domain", serverBundle: bundle(m.ca, m.otherTD), server: m.server,
			client:        m.otherTD.issue(t, otherClientID, time.Hour, t0),
			serverRefuses: ReasonTrustDomain, wantMsg: []string{`peer is in trust domain "other.test": want "cellmesh.test"`}, wantPeer: otherClientID.String()},
		{name: "client-unit-unauthorized", serverBundle: m.ca.cert, server: m.server, authorize: refuseUnit("u2"),
			clientBundle: m.ca.cert, client: m.client,
			serverRefuses: ReasonUnauthorized, wantMsg: []string{"peer is not authorized: unit u2 may not call"}, wantPeer: m.clientID.String()},
		{name: "client-without-identity", serverBundle: m.ca.cert, server: m.server, client: anon,
			serverRefuses: ReasonNoIdentity, wantMsg: []string{`peer certificate has no valid cellmesh identity: certificate "anon" has no URI SAN`}},
		{name: "client-cert-for-servers-only", serverBundle: m.ca.cert, server: m.server, client: serverUsageOnly,
			serverRefuses: ReasonBadCertificate, wantMsg: []string{"may not be used", "incompatible key usage"}, wantPeer: m.clientID.String()},
		{name: "server-not-expected", serverBundle: m.ca.cert, server: m.server,
			clientBundle: m.ca.cert, client: m.client, expect: expectService("billing"),
			clientRefuses: ReasonUnauthorized, wantMsg: []string{"peer is not authorized: want service billing, got ledger"}, wantPeer: m.serverID.String()},
		{name: "server-from-foreign-ca", server: m.foreign.issue(t, m.serverID, time.Hour, t0),
			clientBundle: m.ca.cert, client: m.client,
			clientRefuses: ReasonUnknownCA, wantMsg: []string{"not signed by a trusted mesh CA"}, wantPeer: m.serverID.String()},
		{name: "server-expired", server: m.ca.issue(t, m.serverID, time.Minute, t0.Add(-time.Hour)),
			clientBundle: m.ca.cert, client: m.client,
			clientRefuses: ReasonExpired, wantMsg: []string{"peer certificate expired at 2026-03-01T11:01:00Z"}, wantPeer: m.serverID.String()},
		{name: "server-of-other-trust-domain", serverBundle: bundle(m.ca, m.otherTD), server: m.otherTD.issue(t, otherServerID, time.Hour, t0),
			clientBundle: bundle(m.ca, m.otherTD), client: m.client,
			clientRefuses: ReasonTrustDomain, wantMsg: []string{`peer is in trust domain "other.test": want "cellmesh.test"`}, wantPeer: otherServerID.String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var serverRejects, clientRejects rejects
			var scfg, ccfg *tls.Config
			if tt.serverBundle != nil {
				serverClock := newClock(t0)
				srv := newStore(t, tt.serverBundle, tt.server, serverClock.now)
				serverClock.add(tt.serverNow)
				scfg = srv.ServerConfig(tt.authorize, serverRejects.record)
			} else {
				scfg = barePeer(t, tt.server)
				scfg.ClientAuth = tls.RequireAnyClientCert
			}
			if tt.clientBundle != nil {
				cli := newStore(t, tt.clientBundle, tt.client, func() time.Time { return t0 })
				ccfg = cli.ClientConfig(tt.expect, clientRejects.record)
			} else {
				ccfg = barePeer(t, tt.client)
			}
			ccfg.ServerName = "localhost"
			ln := startServer(t, scfg)
			conn, clientErr := dial(t, ln.addr(), ccfg)
			sr := ln.result(t)

			switch {
			case tt.serverRefuses != "":
				ve := wantVerifyError(t, sr.err, tt.serverRefuses)
				checkRefusal(t, ve, tt.wantMsg, tt.wantPeer)
				if clientErr == nil {
					t.Error("client did not see the server refuse it")
				}
				got := serverRejects.get()
				if len(got) != 1 || got[0].remote != sr.remote || !errors.Is(got[0].err, ve) {
					t.Errorf("server onReject calls %v, want one with remote %s and the error", got, sr.remote)
				}
				if conn != nil {
					t.Error("client got a working connection")
				}
			case tt.clientRefuses != "":
				ve := wantVerifyError(t, clientErr, tt.clientRefuses)
				checkRefusal(t, ve, tt.wantMsg, tt.wantPeer)
				if sr.err == nil {
					t.Error("server did not see the client refuse it")
				}
				got := clientRejects.get()
				if len(got) != 1 || got[0].remote != "localhost" || !errors.Is(got[0].err, ve) {
					t.Errorf("client onReject calls %v, want one with remote localhost and the error", got)
				}
			default:
				if sr.err != nil || clientErr != nil {
					t.Fatalf("handshake failed: server %v, client %v", sr.err, clientErr)
				}
				if id, err := PeerID(sr.state.PeerCertificates); err != nil || id != tt.client.id(t) {
					t.Errorf("server sees client %v, %v; want %v", id, err, tt.client.id(t))
				}
				cs := conn.ConnectionState()
				if id, err := PeerID(cs.PeerCertificates); err != nil || id != m.serverID {
					t.Errorf("client sees server %v, %v; want %v", id, err, m.serverID)
				}
				if cs.Version != tls.VersionTLS13 {
					t.Errorf("TLS version %x, want 1.3", cs.Version)
				}
				if got := append(serverRejects.get(), clientRejects.get()...); len(got) != 0 {
					t.Errorf("onReject called for an accepted handshake: %v", got)
				}
			}
		})
	}
}

// barePeer is a crypto/tls configuration that presents p and verifies
// nothing.
func barePeer(t *testing.T, p pair) *tls.Config {
	t.Helper()
	cert, err := tls.X509KeyPair(p.cert, p.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}}
}

func (p pair) id(t *testing.T) ID {
	t.Helper()
	id, err := PeerID([]*x509.Certificate{parseCert(t, p.cert)})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func checkRefusal(t *testing.T, ve *VerifyError, wantMsg []string, wantPeer string) {
	t.Helper()
	for _, w := range wantMsg {
		if !strings.Contains(ve.Error(), w) {
			t.Errorf("refusal %q lacks %q", ve, w)
		}
	}
	if ve.Peer != wantPeer {
		t.Errorf("refusal names peer %q, want %q", ve.Peer, wantPeer)
	}
	if ve.Err == nil {
		t.Errorf("refusal %q has no detail (Err)", ve)
	}
}

func TestHandshakeClientWithoutCertificate(t *testing.T) {
	m := newMesh(t, time.Now())
	srv := newStore(t, m.ca.cert, m.server, nil)
	ln := startServer(t, srv.ServerConfig(nil, nil))
	_, err := dial(t, ln.addr(), &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true})
	if err == nil {
		t.Error("a client without a certificate got a working connection")
	}
	if sr := ln.result(t); sr.err == nil {
		t.Error("the server accepted a client without a certificate")
	}
}

func TestVerifyPeer(t *testing.T) {
	m := newMesh(t, t0)
	clk := newClock(t0)
	s := newStore(t, m.ca.cert, m.server, clk.now)
	leaf := func(p pair) []*x509.Certificate { return []*x509.Certificate{parseCert(t, p.cert)} }

	id, err := s.VerifyPeer(leaf(m.client), x509.ExtKeyUsageClientAuth, nil)
	if err != nil || id != m.clientID {
		t.Errorf("VerifyPeer = %v, %v; want %v", id, err, m.clientID)
	}
	_, err = s.VerifyPeer(nil, x509.ExtKeyUsageClientAuth, nil)
	wantVerifyError(t, err, ReasonNoCertificate)

	// A leaf that outlives its CA (not one Issue makes) is refused once
	// the CA has expired, naming the CA.
	shortCA := newTestCA(t, td, time.Hour, t0)
	long := signCustom(t, shortCA, &x509.Certificate{URIs: []*url.URL{m.clientID.URI()},
		NotBefore: t0.Add(-time.Minute), NotAfter: t0.Add(48 * time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	s2 := newStore(t, bundle(m.ca, shortCA), m.server, clk.now)
	if _, err := s2.VerifyPeer(leaf(long), x509.ExtKeyUsageClientAuth, nil); err != nil {
		t.Fatalf("before the CA expired: %v", err)
	}
	clk.add(2 * time.Hour)
	_, err = s2.VerifyPeer(leaf(long), x509.ExtKeyUsageClientAuth, nil)
	ve := wantVerifyError(t, err, ReasonExpired)
	checkRefusal(t, ve, []string{`mesh CA "cellmesh mesh CA cellmesh.test" of the peer certificate expired at 2026-03-01T13:00:00Z`}, m.clientID.String())
}

func TestServerConfigWithoutConn(t *testing.T) {
	// quic-go and tests may hand GetConfigForClient a ClientHelloInfo
	// without a connection: the remote is then "unknown".
	m := newMesh(t, time.Now())
	s := newStore(t, m.ca.cert, m.server, nil)
	var r rejects
	cfg := s.ServerConfig(nil, r.record)
	cfg.NextProtos = []string{"cellmesh-test"}
	conn, err := cfg.GetConfigForClient(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	if conn.GetConfigForClient != nil {
		t.Error("the per-connection config calls GetConfigForClient again")
	}
	if len(conn.NextProtos) != 1 || conn.NextProtos[0] != "cellmesh-test" || conn.MinVersion != tls.VersionTLS13 || conn.ClientAuth != tls.RequireAnyClientCert {
		t.Errorf("per-connection config lost settings: NextProtos %v MinVersion %x ClientAuth %v", conn.NextProtos, conn.MinVersion, conn.ClientAuth)
	}
	foreign := m.foreign.issue(t, m.clientID, time.Hour, time.Now())
	err = conn.VerifyConnection(tls.ConnectionState{PeerCertificates: []*x509.Certificate{parseCert(t, foreign.cert)}})
	wantVerifyError(t, err, ReasonUnknownCA)
	if got := r.get(); len(got) != 1 || got[0].remote != "unknown" {
		t.Errorf("onReject calls %v, want one for remote unknown", got)
	}
	// Each call returns a new config.
	a, b := s.ServerConfig(nil, nil), s.ServerConfig(nil, nil)
	c, d := s.ClientConfig(nil, nil), s.ClientConfig(nil, nil)
	if a == b || c == d {
		t.Error("configs are shared between calls")
	}
}

func TestReloadHandshakes(t *testing.T) {
	m := newMesh(t, time.Now())
	dir := t.TempDir()
	f := writeFiles(t, dir, "server", m.ca.cert, m.server)
	srv, err := Load(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	var rejected rejects
	ln := startServer(t, srv.ServerConfig(nil, rejected.record))
	cli := newStore(t, m.ca.cert, m.client, nil)
	serial := func(c *tls.Conn) string { return c.ConnectionState().PeerCertificates[0].SerialNumber.String() }

	first, err := dial(t, ln.addr(), cli.ClientConfig(nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	ln.result(t)
	oldSerial := serial(first)

	// A new server certificate: new handshakes see it, the established
	// connection goes on.
	next := m.ca.issue(t, m.serverID, 7*24*time.Hour, time.Now())
	writeFiles(t, dir, "server", m.ca.cert, next)
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	second, err := dial(t, ln.addr(), cli.ClientConfig(nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	ln.result(t)
	newSerial := parseCert(t, next.cert).SerialNumber.String()
	if got := serial(second); got != newSerial || got == oldSerial {
		t.Errorf("new handshake sees serial %s, want the new %s (old %s)", got, newSerial, oldSerial)
	}
	if err := echo(first, "still here"); err != nil {
		t.Errorf("established connection broke after the reload: %v", err)
	}

	// A broken file: the reload fails and the server keeps its certificate.
	writeFile(t, f.Cert, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	if err := srv.Reload(); err == nil || !strings.Contains(err.Error(), f.Cert) {
		t.Fatalf("Reload() = %v, want an error naming %s", err, f.Cert)
	}
	third, err := dial(t, ln.addr(), cli.ClientConfig(nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	ln.result(t)
	if got := serial(third); got != newSerial {
		t.Errorf("after a failed reload the server presents serial %s, want %s", got, newSerial)
	}

	// A CA rotation: a client of a new CA is refused until the bundle holds
	// the new CA too; then clients of both are accepted.
	newCA := newTestCA(t, td, 30*24*time.Hour, time.Now())
	newClient := newStore(t, bundle(m.ca, newCA), newCA.issue(t, m.clientID, time.Hour, time.Now()), nil)
	if _, err := dial(t, ln.addr(), newClient.ClientConfig(nil, nil)); err == nil {
		t.Fatal("a client of a CA not in the bundle was accepted")
	}
	wantVerifyError(t, ln.result(t).err, ReasonUnknownCA)
	writeFiles(t, dir, "server", bundle(m.ca, newCA), next)
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*Store{"old CA": cli, "new CA": newClient} {
		if _, err := dial(t, ln.addr(), c.ClientConfig(nil, nil)); err != nil {
			t.Errorf("client of the %s: %v", name, err)
		}
		if r := ln.result(t); r.err != nil {
			t.Errorf("server refused the client of the %s: %v", name, r.err)
		}
	}
	if got := rejected.get(); len(got) != 1 {
		t.Errorf("onReject called %d times, want once", len(got))
	}
	if err := echo(first, "still here"); err != nil {
		t.Errorf("established connection broke after the CA rotation: %v", err)
	}
}

func TestOnRejectRemoteIsClientAddress(t *testing.T) {
	m := newMesh(t, time.Now())
	srv := newStore(t, m.ca.cert, m.server, nil)
	var r rejects
	ln := startServer(t, srv.ServerConfig(nil, r.record))
	cli := newStore(t, bundle(m.ca, m.foreign), m.foreign.issue(t, m.clientID, time.Hour, time.Now()), nil)
	local := make(chan string, 1)
	d := net.Dialer{}
	ccfg := cli.ClientConfig(nil, nil)
	ccfg.ServerName = "localhost"
	c, err := d.Dial("tcp", ln.addr())
	if err != nil {
		t.Fatal(err)
	}
	local <- c.LocalAddr().String()
	tc := tls.Client(c, ccfg)
	defer tc.Close()
	_ = tc.Handshake()
	_ = echo(tc, "x")
	ln.result(t)
	want := <-local
	if got := r.get(); len(got) != 1 || got[0].remote != want {
		t.Errorf("onReject calls %v, want one with remote %s", got, want)
	}
}
