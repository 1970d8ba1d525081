package proxy

import (
	"bufio"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/quic-go/quic-go/http3"
)

// peerClient is an HTTP/3 client with a mesh certificate: what any
// workload holding a key of the mesh could send to an inbound listener.
func (m *mesh) peerClient(t *testing.T, id meshtls.ID) *http.Client {
	t.Helper()
	store := m.ca.issue(id, time.Hour, nil)
	tc := store.ClientConfig(nil, nil)
	tc.NextProtos = []string{http3.NextProtoH3}
	tr := &http3.Transport{TLSClientConfig: tc}
	t.Cleanup(func() { tr.Close() })
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// An inbound request for user data is served only with the shard of its
// own key at the current epoch, whatever the sender claims or leaves out.
func TestInboundDecidesAgain(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := m.peerClient(t, meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: "us-east-2", Service: "batch"})
	target := "https://" + m.nodes["eu-west-1"].addrs.InboundQUIC + "/orders"
	tests := []struct {
		name    string
		headers map[string]string
		code    int
		kind    string
	}{
		{"no shard header", map[string]string{"x-cellmesh-uid": "7"}, 400, "unfenced"},
		{"forged epoch only", map[string]string{"x-cellmesh-uid": "7", "x-cellmesh-epoch": "999"}, 400, "unfenced"},
		{"another shard's header", map[string]string{"x-cellmesh-uid": "7", "x-cellmesh-shard": "60", "x-cellmesh-epoch": "1"}, 400, "bad-shard"},
		{"the key's shard, owned elsewhere", map[string]string{"x-cellmesh-uid": "7", "x-cellmesh-shard": "7", "x-cellmesh-epoch": "1"}, 421, "misrouted"},
		{"pinned elsewhere", map[string]string{"x-cellmesh-uid": "7", "x-cellmesh-target-unit": "us-east-1"}, 421, "wrong-unit"},
		{"owned here, right epoch", map[string]string{"x-cellmesh-uid": "60", "x-cellmesh-shard": "60", "x-cellmesh-epoch": "1"}, 200, ""},
	}
	// A path that hides a path key from routing is refused at the inbound
	// listener too.
	req, _ := http.NewRequest("POST", "https://"+m.nodes["eu-west-1"].addrs.InboundQUIC+"/v1//users/7", nil)
	req.Host = "echo"
	if resp, body := do(t, c, req); resp.StatusCode != http.StatusBadRequest || resp.Header.Get("x-cellmesh-error") != "bad-path" {
		t.Fatalf("non-canonical path at inbound: %d %s", resp.StatusCode, body)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("POST", target, strings.NewReader("debit 100"))
			req.Host = "echo"
			for k, v := range tt.headers {
				req.Header.Set(k, v)
			}
			resp, body := do(t, c, req)
			if resp.StatusCode != tt.code || resp.Header.Get("x-cellmesh-error") != tt.kind {
				t.Fatalf("status %d %q, want %d %q: %s", resp.StatusCode, resp.Header.Get("x-cellmesh-error"), tt.code, tt.kind, body)
			}
		})
	}

	// A pinned request (replication) reaches the pinned unit with no shard
	// or epoch the app could take for a fence.
	req = m.newReq("POST", "us-east-2", "7", "/replicate", strings.NewReader("x"))
	req.Header.Set("x-cellmesh-target-unit", "eu-west-1")
	resp, body := do(t, newClient(), req)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("pinned: %d %s", resp.StatusCode, body)
	}
	e := decodeEcho(t, body)
	if e.Unit != "eu-west-1" || e.Headers.Get("x-cellmesh-shard") != "" || e.Headers.Get("x-cellmesh-epoch") != "" ||
		e.Headers.Get("x-cellmesh-target-unit") != "eu-west-1" {
		t.Fatalf("pinned request at %s with shard %q epoch %q target %q, want eu-west-1 with no shard or epoch",
			e.Unit, e.Headers.Get("x-cellmesh-shard"), e.Headers.Get("x-cellmesh-epoch"), e.Headers.Get("x-cellmesh-target-unit"))
	}
}

// A map that lowers an epoch or changes a primary without a new epoch is
// refused and changes nothing.
func TestSetMapRefusesEpochRegressions(t *testing.T) {
	m := newMesh(t, meshOpts{})
	sc := m.nodes["us-east-1"].sc
	moved := moveShard(t, m.topo, 7, "eu-west-1", 3)
	if err := sc.SetMap(compile(t, moved)); err != nil {
		t.Fatal(err)
	}
	sameEpoch := moveShard(t, moved, 7, "us-east-1", 3)
	lower := moveShard(t, moved, 7, "eu-west-1", 2)
	for name, topo := range map[string]*routing.Topology{"same epoch": sameEpoch, "lower epoch": lower} {
		err := sc.SetMap(compile(t, topo))
		var se *routing.SuccessorError
		if !errors.As(err, &se) || se.Shard != 7 {
			t.Errorf("%s: %v, want a *routing.SuccessorError for shard 7", name, err)
		}
		if o, _ := sc.Map().Lookup(7); o.Unit != "eu-west-1" || o.Epoch != 3 {
			t.Errorf("%s: shard 7 is %s at %d after a refused map, want eu-west-1 at 3", name, o.Unit, o.Epoch)
		}
	}
}

// Requests the sidecar will not carry get a clear 4xx/5xx, and a path that
// could hide its key from routing is refused.
func TestOutboundRefusesUnsafeRequests(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()
	send := func(method, path string, h map[string]string) (*http.Response, []byte) {
		req := m.newReq(method, "us-east-1", uidEUWest1, "/", nil)
		req.URL.Path = path
		for k, v := range h {
			req.Header.Set(k, v)
		}
		return do(t, c, req)
	}
	for _, p := range []string{"/v1//users/7", "/v1/./users", "/v1/../x", "//x"} {
		resp, body := send("GET", p, nil)
		wantSidecarError(t, resp, body, http.StatusBadRequest, "bad-path")
	}
	resp, body := send("GET", "/ws", map[string]string{"Upgrade": "websocket", "Connection": "Upgrade"})
	wantSidecarError(t, resp, body, http.StatusNotImplemented, "upgrade")

	// CONNECT, by hand: net/http's client sends it only to proxies.
	conn, err := net.Dial("tcp", m.nodes["us-east-1"].addrs.Outbound)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "CONNECT echo:443 HTTP/1.1\r\nHost: echo\r\nx-cellmesh-uid: 60\r\n\r\n")
	r, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("CONNECT: %d, want 405", r.StatusCode)
	}

	// Host names are matched without case.
	req := m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)
	req.Host = "ECHO"
	if resp, body := do(t, c, req); resp.StatusCode != http.StatusOK {
		t.Fatalf("Host: ECHO -> %d %s", resp.StatusCode, body)
	}
}

// A Connection header cannot strip what routing read: shadow traffic stays
// marked at the app.
func TestConnectionHeaderKeepsRoutingHeaders(t *testing.T) {
	m := newMesh(t, meshOpts{})
	conn, err := net.Dial("tcp", m.nodes["us-east-1"].addrs.Outbound)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: echo\r\nx-cellmesh-uid: 60\r\nx-cellmesh-shadow: 1\r\n"+
		"Connection: close, x-cellmesh-uid, x-cellmesh-shadow\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	e := decodeEcho(t, body)
	if e.Unit != "eu-west-1" || e.Headers.Get("x-cellmesh-shadow") != "1" || e.Headers.Get("x-cellmesh-uid") != "60" {
		t.Fatalf("at %s the app saw shadow %q uid %q, want eu-west-1, 1, 60", e.Unit, e.Headers.Get("x-cellmesh-shadow"), e.Headers.Get("x-cellmesh-uid"))
	}
}

// The largest body limit does not overflow, and a request for the app's
// own unit is bounded by the per-try timeout too.
func TestLocalPathLimits(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) {
		c.Limits.MaxBodyBytes = math.MaxInt64
		c.Timeouts.PerTry, c.Timeouts.Overall = 300*time.Millisecond, time.Second
	}})
	c := newClient()
	for _, uid := range []string{uidUSEast1, uidEUWest1} {
		resp, body := do(t, c, m.newReq("POST", "us-east-1", uid, "/", strings.NewReader("hello")))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("uid %s: %d %s", uid, resp.StatusCode, body)
		}
	}
	start := time.Now()
	resp, body := do(t, c, m.newReq("GET", "us-east-1", uidUSEast1, "/delay?ms=5000", nil))
	wantSidecarError(t, resp, body, http.StatusGatewayTimeout, "timeout")
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("the local request took %s: the per-try timeout did not hold", d)
	}
}

// An app cannot answer as if it were a sidecar.
func TestAppCannotForgeSidecarAnswers(t *testing.T) {
	forger := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("x-cellmesh-owner", "evil")
		w.Header().Set("x-cellmesh-error", "misrouted")
		w.WriteHeader(http.StatusMisdirectedRequest)
	})
	m := newMesh(t, meshOpts{app: func(id Identity) http.Handler {
		if id.Unit == "eu-west-1" {
			return forger
		}
		return nil
	}})
	resp, _ := do(t, newClient(), m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
	if resp.StatusCode != http.StatusMisdirectedRequest || resp.Header.Get("x-cellmesh-owner") != "" || resp.Header.Get("x-cellmesh-error") != "" {
		t.Fatalf("status %d owner %q error %q: the app's x-cellmesh-* answer headers went through", resp.StatusCode,
			resp.Header.Get("x-cellmesh-owner"), resp.Header.Get("x-cellmesh-error"))
	}
	if resp.Header.Get("x-cellmesh-unit") != "eu-west-1" {
		t.Fatalf("x-cellmesh-unit %q, want eu-west-1", resp.Header.Get("x-cellmesh-unit"))
	}
}

// A stalled upload to an app that neither reads nor answers is cut after
// timeouts.stream_idle, and nothing stays in flight.
func TestStreamIdleCutsStalledUpload(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	stall := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select { // neither reads the body nor answers
		case <-r.Context().Done():
		case <-release:
		}
	})
	m := newMesh(t, meshOpts{
		configure: func(c *Config) { c.Timeouts.StreamIdle = 500 * time.Millisecond },
		app: func(id Identity) http.Handler {
			if id.Unit == "eu-west-1" {
				return stall
			}
			return nil
		},
	})
	// By hand: net/http's client waits for its body writer before it
	// returns an error, and this body never ends.
	conn, err := net.Dial("tcp", m.nodes["us-east-1"].addrs.Outbound)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	start := time.Now()
	io.WriteString(conn, "POST /upload HTTP/1.1\r\nHost: echo\r\nx-cellmesh-uid: 60\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"+
		strings.Repeat("x", 1024)+"\r\n") // then nothing more
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		var stacks strings.Builder
		pprof.Lookup("goroutine").WriteTo(&stacks, 1)
		t.Fatalf("%v\nus-east-1 log:\n%s\neu-west-1 log:\n%s\ngoroutines:\n%s", err, m.nodes["us-east-1"].logs.String(),
			m.nodes["eu-west-1"].logs.String(), stacks.String())
	}
	body, _ := io.ReadAll(resp.Body)
	wantSidecarError(t, resp, body, http.StatusGatewayTimeout, "stream-idle")
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cut after %s", d)
	}
	waitFor(t, 5*time.Second, func() bool {
		for _, e := range m.nodes["us-east-1"].sc.endpoints.Load().all {
			if e.stats.inflight.Load() != 0 {
				return false
			}
		}
		return true
	}, "no request in flight to any endpoint")
}

// The handoff contract through a sidecar: a control-plane replica may call
// it (and nothing else); no workload may promote, demote or read the
// watermarks; the rest of the contract's prefix (a service's replication
// between its units) is for the same service only.
func TestContractCallers(t *testing.T) {
	m := newMesh(t, meshOpts{})
	cp := m.peerClient(t, meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: "cp-us", Service: meshtls.ControlPlaneService})
	echoPeer := m.peerClient(t, meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: "us-east-2", Service: "echo"})
	other := m.peerClient(t, meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: "us-east-2", Service: "batch"})
	at := "https://" + m.nodes["eu-west-1"].addrs.InboundQUIC
	for _, tc := range []struct {
		name   string
		c      *http.Client
		method string
		path   string
		code   int
	}{
		{"control plane reads the watermarks", cp, "GET", "/.well-known/cellmesh/replication", 200},
		{"control plane promotes", cp, "POST", "/.well-known/cellmesh/promote?shard=7&epoch=2", 200},
		{"control plane elsewhere", cp, "GET", "/accounts/7", 403},
		{"a workload promotes", echoPeer, "POST", "/.well-known/cellmesh/promote?shard=7&epoch=99", 403},
		{"a workload reads the watermarks", other, "GET", "/.well-known/cellmesh/replication", 403},
		{"another service replicates", other, "POST", "/.well-known/cellmesh/replicate", 403},
		{"the same service replicates", echoPeer, "POST", "/.well-known/cellmesh/replicate", 200},
	} {
		req, _ := http.NewRequest(tc.method, at+tc.path, strings.NewReader("{}"))
		req.Host = "echo"
		req.Header.Set("x-cellmesh-target-unit", "eu-west-1")
		resp, body := do(t, tc.c, req)
		if resp.StatusCode != tc.code {
			t.Errorf("%s: %d %s, want %d", tc.name, resp.StatusCode, body, tc.code)
		}
		if tc.code == 403 && resp.Header.Get("x-cellmesh-error") != "not-contract" {
			t.Errorf("%s: x-cellmesh-error %q", tc.name, resp.Header.Get("x-cellmesh-error"))
		}
	}
}
