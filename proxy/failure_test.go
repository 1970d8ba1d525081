package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/examples/echo"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Uids homed in each unit of examples/local/topology.yaml (uid mod 100).
const (
	uidUSEast1 = "10" // shard 10
	uidUSEast2 = "30" // shard 30
	uidEUWest1 = "60" // shard 60
	uidEUWest2 = "80" // shard 80
)

// newReq is a request for path through the outbound listener of unit from,
// for the echo service, with uid (if any) as x-cellmesh-uid.
func (m *mesh) newReq(method, from, uid, path string, body io.Reader) *http.Request {
	m.t.Helper()
	req, err := http.NewRequest(method, "http://"+m.nodes[from].addrs.Outbound+path, body)
	if err != nil {
		m.t.Fatal(err)
	}
	req.Host = "echo"
	if uid != "" {
		req.Header.Set("x-cellmesh-uid", uid)
	}
	return req
}

// tryDo is do without t.Fatal, for goroutines other than the test's.
func tryDo(c *http.Client, req *http.Request) (*http.Response, []byte, error) {
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// wantSidecarError checks a reply the sidecar gave itself.
func wantSidecarError(t *testing.T, resp *http.Response, body []byte, code int, kind string) {
	t.Helper()
	if resp.StatusCode != code || resp.Header.Get("x-cellmesh-error") != kind {
		t.Fatalf("status %d x-cellmesh-error %q, want %d %q: %s", resp.StatusCode, resp.Header.Get("x-cellmesh-error"), code, kind, body)
	}
}

// deadUDPAddr is a 127.0.0.1 UDP port nobody listens on.
func deadUDPAddr(t *testing.T) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	a := c.LocalAddr().String()
	c.Close()
	return a
}

// requestCount sums cellmesh_requests_total of a node in one direction.
func requestCount(t *testing.T, n *node, direction string) float64 {
	t.Helper()
	mfs, err := n.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != "cellmesh_requests_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == "direction" && l.GetValue() == direction {
					sum += mt.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// The destination app is down: its sidecar answers 503 app-down at once.
func TestAppDown(t *testing.T) {
	m := newMesh(t, meshOpts{})
	m.nodes["eu-west-1"].app.Close()
	c := &http.Client{Timeout: 10 * time.Second}
	start := time.Now()
	resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
	wantSidecarError(t, resp, body, http.StatusServiceUnavailable, "app-down")
	if !strings.Contains(string(body), "refused the connection") {
		t.Errorf("body does not say the app refused the connection: %q", body)
	}
	if got := resp.Header.Get("x-cellmesh-unit"); got != "eu-west-1" {
		t.Errorf("answered by unit %q, want eu-west-1 (the app's sidecar)", got)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("app-down answer took %s", d)
	}
}

// A peer sidecar that is down is reported as unreachable by the sender,
// with or without a retry.
func TestPeerSidecarDown(t *testing.T) {
	for _, tc := range []struct {
		name    string
		retries int
	}{{"no-retry", -1}, {"default-retry", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, meshOpts{configure: func(c *Config) { c.Timeouts.Connect, c.Retries = time.Second, tc.retries }})
			c := &http.Client{Timeout: 10 * time.Second}
			sender := m.nodes["us-east-1"]
			if resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)); resp.StatusCode != http.StatusOK {
				t.Fatalf("before shutdown: status %d: %s", resp.StatusCode, body)
			}
			m.nodes["eu-west-1"].shutdown(t)
			start := time.Now()
			resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("answer for a dead peer took %s", d)
			}
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("status %d, want 503: %s", resp.StatusCode, body)
			}
			if got := testutil.ToFloat64(sender.sc.m.unreachable.WithLabelValues("eu-west-1")); got != 1 {
				t.Errorf("connect failures to eu-west-1 = %v, want 1", got)
			}
			wantSidecarError(t, resp, body, http.StatusServiceUnavailable, "unreachable")
			if !strings.Contains(string(body), "eu-west-1") {
				t.Errorf("body does not name the unit: %q", body)
			}
		})
	}
}

// With two endpoints for a unit, one dead, the request succeeds through the
// retry on the other.
func TestRetryOnDeadEndpoint(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) { c.Timeouts.Connect = time.Second }})
	c := &http.Client{Timeout: 10 * time.Second}
	sender := m.nodes["us-east-1"]
	// The dead endpoint comes first, so that it is picked first (every
	// in-flight count is 0).
	eps := []Endpoint{{Service: "echo", Unit: "eu-west-1", Address: deadUDPAddr(t), Transport: QUIC}}
	eps = append(eps, m.endpoints()...)
	if err := sender.sc.SetEndpoints(eps, 2); err != nil {
		t.Fatal(err)
	}
	resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200 through the retry: %s", resp.StatusCode, body)
	}
	if u := decodeEcho(t, body).Unit; u != "eu-west-1" {
		t.Errorf("answered by %s, want eu-west-1", u)
	}
	if got := testutil.ToFloat64(sender.sc.m.unreachable.WithLabelValues("eu-west-1")); got != 1 {
		t.Errorf("connect failures to eu-west-1 = %v, want 1 (the dead endpoint was tried first)", got)
	}
	// The dead endpoint is now ejected: the next request goes straight to
	// the live one.
	start := time.Now()
	resp, body = do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("second request: status %d: %s", resp.StatusCode, body)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("second request took %s: the ejected endpoint was tried again", d)
	}
	var healthy, ejected int
	for _, e := range sender.sc.Status().Endpoints {
		if e.Unit == "eu-west-1" {
			if e.Healthy {
				healthy++
			} else {
				ejected++
			}
		}
	}
	if healthy != 1 || ejected != 1 {
		t.Errorf("eu-west-1 endpoints: %d healthy, %d ejected; want 1 and 1", healthy, ejected)
	}
}

// The per-try timeout cuts an attempt that gets no response headers.
func TestPerTryTimeout(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) {
		c.Timeouts.PerTry, c.Timeouts.Overall = 300*time.Millisecond, 2*time.Second
	}})
	c := &http.Client{Timeout: 10 * time.Second}
	// A first request sets up the QUIC connection, so the handshake does
	// not count against the slow request's 300ms.
	if resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/delay?ms=0", nil)); resp.StatusCode != http.StatusOK {
		t.Fatalf("warm-up: status %d: %s", resp.StatusCode, body)
	}
	start := time.Now()
	resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/delay?ms=5000", nil))
	d := time.Since(start)
	wantSidecarError(t, resp, body, http.StatusGatewayTimeout, "timeout")
	if d > 4*time.Second {
		t.Errorf("504 came after %s, want well under the app's 5s", d)
	}
	if !strings.Contains(string(body), "per-try timeout") {
		t.Errorf("body does not name the per-try timeout: %q", body)
	}
	// The cut request leaves nothing in flight at either sidecar.
	waitFor(t, 5*time.Second, func() bool {
		return testutil.ToFloat64(m.nodes["eu-west-1"].sc.m.inflight.WithLabelValues("inbound")) == 0 &&
			testutil.ToFloat64(m.nodes["us-east-1"].sc.m.inflight.WithLabelValues("outbound")) == 0
	}, "no request in flight after the timeout")
}

// Requests the outbound listener cannot route are refused with a 4xx that
// names why.
func TestOutboundRefusals(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()

	t.Run("unknown-service", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidUSEast1, "/", nil)
		req.Host = "nosuch"
		resp, body := do(t, c, req)
		wantSidecarError(t, resp, body, http.StatusNotFound, "unknown-service")
	})
	t.Run("service-header-wins", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)
		req.Host = "nosuch"
		req.Header.Set("x-cellmesh-service", "echo")
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK || decodeEcho(t, body).Unit != "eu-west-1" {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
	})
	t.Run("no-service", func(t *testing.T) {
		// HTTP/1.0 allows a request without Host; net/http refuses one in
		// HTTP/1.1 before the sidecar sees it.
		conn, err := net.DialTimeout("tcp", m.nodes["us-east-1"].addrs.Outbound, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET / HTTP/1.0\r\nX-Cellmesh-Uid: %s\r\n\r\n", uidUSEast1)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		wantSidecarError(t, resp, body, http.StatusBadRequest, "no-service")
	})
	t.Run("bad-key", func(t *testing.T) {
		resp, body := do(t, c, m.newReq("GET", "us-east-1", "abc", "/", nil))
		wantSidecarError(t, resp, body, http.StatusBadRequest, "bad-key")
	})
	t.Run("unknown-unit", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidUSEast1, "/", nil)
		req.Header.Set("x-cellmesh-target-unit", "nosuch")
		resp, body := do(t, c, req)
		wantSidecarError(t, resp, body, http.StatusBadRequest, "unknown-unit")
		if !strings.Contains(string(body), `"nosuch"`) {
			t.Errorf("body does not name the unit: %q", body)
		}
	})
	t.Run("target-unit", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidUSEast1, "/", nil)
		req.Header.Set("x-cellmesh-target-unit", "eu-west-2")
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		e := decodeEcho(t, body)
		if e.Unit != "eu-west-2" {
			t.Errorf("answered by %s, want the pinned eu-west-2", e.Unit)
		}
		for _, h := range []string{"x-cellmesh-shard", "x-cellmesh-epoch"} {
			if v, ok := e.Headers[http.CanonicalHeaderKey(h)]; ok {
				t.Errorf("app saw %s %q on a pinned request, want none", h, v)
			}
		}
		if got := e.Headers.Get("x-cellmesh-target-unit"); got != "eu-west-2" {
			t.Errorf("app saw x-cellmesh-target-unit %q, want eu-west-2", got)
		}
	})
}

// An app cannot forge the routing headers its sidecar sets, whether the
// request crosses the mesh or stays in the unit.
func TestForgedHeadersReplaced(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()
	for _, tc := range []struct {
		name, uid, unit, region, shard string
	}{
		{"remote", uidEUWest1, "eu-west-1", "eu-west", "60"},
		{"local", uidUSEast1, "us-east-1", "us-east", "10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := m.newReq("GET", "us-east-1", tc.uid, "/", nil)
			req.Header.Set("x-cellmesh-epoch", "999")
			req.Header.Set("x-cellmesh-origin-unit", "evil")
			req.Header.Set("x-cellmesh-shard", "3")
			req.Header.Set("x-cellmesh-unit", "evil")
			req.Header.Set("x-cellmesh-region", "evil")
			req.Header.Set("x-cellmesh-hops", "7")
			resp, body := do(t, c, req)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			e := decodeEcho(t, body)
			for h, want := range map[string]string{
				"x-cellmesh-epoch": "1", "x-cellmesh-origin-unit": "us-east-1", "x-cellmesh-shard": tc.shard,
				"x-cellmesh-unit": tc.unit, "x-cellmesh-region": tc.region,
			} {
				if got := e.Headers[http.CanonicalHeaderKey(h)]; len(got) != 1 || got[0] != want {
					t.Errorf("app saw %s %q, want exactly %q", h, got, want)
				}
			}
			if got, ok := e.Headers["X-Cellmesh-Hops"]; ok {
				t.Errorf("app saw x-cellmesh-hops %q, want none", got)
			}
		})
	}
}

// Oversized requests are refused with a 4xx before they are forwarded.
func TestRequestLimits(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) {
		c.Limits.MaxHeaderBytes = 4096
		c.Limits.MaxBodyBytes = 1024
	}})
	c := newClient()
	dst := m.nodes["eu-west-1"]

	t.Run("header", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)
		req.Header.Set("x-big", strings.Repeat("a", 8<<10))
		resp, body, err := tryDo(c, req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status %d, want 431: %s", resp.StatusCode, body)
		}
	})
	t.Run("header-within-limit", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)
		req.Header.Set("x-big", strings.Repeat("a", 2<<10))
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
	})
	// The limit is on what the app sends: about 3.7 KiB of headers are
	// under 4 KiB wherever they go, and about 6.1 KiB are over it.
	t.Run("header-under-limit-remote", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidEUWest1, "/", nil)
		req.Header.Set("x-big", strings.Repeat("a", 3600))
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
	})
	t.Run("header-over-limit-local", func(t *testing.T) {
		req := m.newReq("GET", "us-east-1", uidUSEast1, "/", nil)
		req.Header.Set("x-big", strings.Repeat("a", 6000))
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status %d, want 431: %s", resp.StatusCode, body)
		}
	})
	t.Run("body-with-length", func(t *testing.T) {
		before := requestCount(t, dst, "inbound")
		resp, body := do(t, c, m.newReq("POST", "us-east-1", uidEUWest1, "/", bytes.NewReader(make([]byte, 4<<10))))
		wantSidecarError(t, resp, body, http.StatusRequestEntityTooLarge, "body-too-large")
		if requestCount(t, dst, "inbound") != before {
			t.Errorf("the oversized request reached the destination")
		}
	})
	t.Run("body-chunked", func(t *testing.T) {
		req := m.newReq("POST", "us-east-1", uidEUWest1, "/", io.MultiReader(bytes.NewReader(make([]byte, 4<<10))))
		req.ContentLength = -1
		resp, body, err := tryDo(c, req)
		if err != nil {
			t.Logf("chunked oversized body: request failed: %v", err)
			return
		}
		if resp.StatusCode < 400 || resp.StatusCode >= 500 {
			e := ""
			if resp.StatusCode == http.StatusOK {
				e = fmt.Sprintf(" (the app read %d bytes)", decodeEcho(t, body).BodyBytes)
			}
			t.Fatalf("status %d%s, want a 4xx: %s", resp.StatusCode, e, body)
		}
		if resp.StatusCode != http.StatusRequestEntityTooLarge || resp.Header.Get("x-cellmesh-error") != "body-too-large" {
			t.Errorf("status %d x-cellmesh-error %q, want 413 body-too-large: %s", resp.StatusCode, resp.Header.Get("x-cellmesh-error"), body)
		}
	})
	t.Run("body-within-limit", func(t *testing.T) {
		req := m.newReq("POST", "us-east-1", uidEUWest1, "/", io.MultiReader(bytes.NewReader(make([]byte, 1000))))
		req.ContentLength = -1
		resp, body := do(t, c, req)
		if resp.StatusCode != http.StatusOK || decodeEcho(t, body).BodyBytes != 1000 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
	})
}

// Swapping the shard map on every sidecar while requests flow fails none.
func TestMapSwapUnderLoad(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var (
		stop     = make(chan struct{})
		wg       sync.WaitGroup
		total    atomic.Int64
		failed   atomic.Int64
		firstErr atomic.Value
	)
	for i := range 20 {
		from := m.order[i%len(m.order)]
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest("GET", "http://"+m.nodes[from].addrs.Outbound+"/", nil)
				req.Host = "echo"
				req.Header.Set("x-cellmesh-uid", uidEUWest2)
				resp, body, err := tryDo(c, req)
				total.Add(1)
				if err != nil || resp.StatusCode != http.StatusOK {
					failed.Add(1)
					if err == nil {
						err = fmt.Errorf("status %d: %s", resp.StatusCode, body)
					}
					firstErr.CompareAndSwap(nil, fmt.Sprintf("from %s: %v", from, err))
				}
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	topo := m.topo.Clone()
	for range 50 {
		topo.Version++
		next := compile(t, topo)
		for _, u := range m.order {
			if err := m.nodes[u].sc.SetMap(next); err != nil {
				t.Fatalf("SetMap version %d on %s: %v", topo.Version, u, err)
			}
		}
		// Let some requests run on this map before the next swap.
		seen := total.Load()
		waitFor(t, 10*time.Second, func() bool { return total.Load() >= seen+10 }, "requests between swaps")
	}
	close(stop)
	wg.Wait()
	stop = make(chan struct{})
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed during map swaps; first: %v", n, total.Load(), firstErr.Load())
	}
	for _, u := range m.order {
		if v := m.nodes[u].sc.Map().Version(); v != 51 {
			t.Errorf("%s routes with map version %d, want 51", u, v)
		}
	}
	t.Logf("%d requests over 50 swaps", total.Load())
}

// Many concurrent clients, each user answered by its home unit.
func TestConcurrentClients(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	var wg sync.WaitGroup
	var bad atomic.Int64
	for i := range 200 {
		from := m.order[i%len(m.order)]
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		wg.Go(func() {
			for range 5 {
				uid := strconv.FormatUint(rng.Uint64(), 10)
				want, _ := homeOf(uid)
				req, _ := http.NewRequest("GET", "http://"+m.nodes[from].addrs.Outbound+"/", nil)
				req.Host = "echo"
				req.Header.Set("x-cellmesh-uid", uid)
				req.Header.Set("x-echo-small", "1")
				resp, body, err := tryDo(c, req)
				switch {
				case err != nil:
					t.Errorf("uid %s from %s: %v", uid, from, err)
				case resp.StatusCode != http.StatusOK:
					t.Errorf("uid %s from %s: status %d: %s", uid, from, resp.StatusCode, body)
				case string(body) != fmt.Sprintf("unit=%s region=%s\n", want, m.nodes[want].id.Region):
					t.Errorf("uid %s from %s: answered %q, want unit %s", uid, from, body, want)
				default:
					continue
				}
				if bad.Add(1) > 10 {
					return
				}
			}
		})
	}
	wg.Wait()
}

// Metrics lint clean and the admin port serves health, readiness, metrics
// and configuration.
func TestMetricsAndAdmin(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()
	for _, from := range m.order {
		for _, uid := range []string{uidUSEast1, uidUSEast2, uidEUWest1, uidEUWest2} {
			if resp, body := m.get(c, from, uid, "/"); resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
		}
	}
	m.get(c, "us-east-1", "abc", "/") // a 400, counted too
	for _, u := range m.order {
		n := m.nodes[u]
		// A request is counted when its handler returns, which may be just
		// after the client has the whole answer.
		wantOut := 4.0
		if u == "us-east-1" {
			wantOut = 5
		}
		waitFor(t, 5*time.Second, func() bool {
			return requestCount(t, n, "inbound") == 3 && requestCount(t, n, "outbound") == wantOut
		}, u+" to count its requests")
		problems, err := testutil.GatherAndLint(n.reg)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("%s: metric %s: %s", u, p.Metric, p.Text)
		}
		mfs, err := n.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		dirs := map[string]bool{}
		for _, mf := range mfs {
			if mf.GetName() != "cellmesh_requests_total" {
				continue
			}
			for _, mt := range mf.GetMetric() {
				for _, l := range mt.GetLabel() {
					if l.GetName() == "direction" {
						dirs[l.GetValue()] = true
					}
				}
			}
		}
		if !dirs["outbound"] || !dirs["inbound"] {
			t.Errorf("%s: cellmesh_requests_total directions %v, want outbound and inbound", u, dirs)
		}
		// One request from each other unit came in; each unit sent one to
		// every unit (its own included).
		for _, src := range m.order {
			if src == u {
				continue
			}
			if got := testutil.ToFloat64(n.sc.m.requests.WithLabelValues("inbound", "echo", src, u, "rzone", "200", "false")); got != 1 {
				t.Errorf("%s: inbound requests from %s = %v, want 1", u, src, got)
			}
		}
		for _, dst := range m.order {
			if got := testutil.ToFloat64(n.sc.m.requests.WithLabelValues("outbound", "echo", u, dst, "rzone", "200", "false")); got != 1 {
				t.Errorf("%s: outbound requests to %s = %v, want 1", u, dst, got)
			}
		}

		admin := "http://" + n.addrs.Admin
		for _, p := range []string{"/healthz", "/readyz", "/metrics", "/config"} {
			req, _ := http.NewRequest("GET", admin+p, nil)
			resp, body := do(t, c, req)
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s %s: status %d: %s", u, p, resp.StatusCode, body)
				continue
			}
			switch p {
			case "/metrics":
				if !bytes.Contains(body, []byte("cellmesh_requests_total{")) {
					t.Errorf("%s /metrics has no cellmesh_requests_total", u)
				}
			case "/config":
				var st struct {
					MapVersion uint64            `json:"map_version"`
					Endpoints  []json.RawMessage `json:"endpoints"`
					Ready      bool              `json:"ready"`
					Identity   struct {
						Unit string `json:"unit"`
					} `json:"identity"`
				}
				if err := json.Unmarshal(body, &st); err != nil {
					t.Fatalf("%s /config: %v: %s", u, err, body)
				}
				if st.MapVersion != 1 || len(st.Endpoints) != 4 || !st.Ready || st.Identity.Unit != u {
					t.Errorf("%s /config: map_version %d, %d endpoints, ready %v, unit %q; want 1, 4, true, %s",
						u, st.MapVersion, len(st.Endpoints), st.Ready, st.Identity.Unit, u)
				}
			}
		}
	}
}

// A sidecar shutting down lets the requests in flight finish, then refuses
// new ones.
func TestDrainFinishesInFlight(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) { c.Timeouts.Connect = time.Second }})
	c := &http.Client{Timeout: 10 * time.Second}
	b := m.nodes["eu-west-1"]

	type result struct {
		code int
		body []byte
		err  error
	}
	res := make(chan result, 1)
	slow := m.newReq("GET", "us-east-1", uidEUWest1, "/delay?ms=1500", nil)
	go func() {
		resp, body, err := tryDo(c, slow)
		if err != nil {
			res <- result{err: err}
			return
		}
		res <- result{code: resp.StatusCode, body: body}
	}()
	waitFor(t, 5*time.Second, func() bool {
		return testutil.ToFloat64(b.sc.m.inflight.WithLabelValues("inbound")) == 1
	}, "the slow request to reach eu-west-1")

	b.stop()
	b.stop = nil
	waitFor(t, time.Second, func() bool { return !b.sc.Ready() }, "eu-west-1 not ready while draining")
	// The admin port stays up while the sidecar drains, and says so.
	readyz, err := http.NewRequest("GET", "http://"+b.addrs.Admin+"/readyz", nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp, body, err := tryDo(c, readyz); err != nil || resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "draining") {
		t.Errorf("/readyz while draining: %v %v %q, want 503 draining", resp, err, body)
	}
	select {
	case err := <-b.done:
		if err != nil {
			t.Errorf("Run returned %v, want nil after a complete drain", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("eu-west-1 did not stop within 10s")
	}
	select {
	case r := <-res:
		if r.err != nil || r.code != http.StatusOK {
			t.Fatalf("in-flight request: status %d err %v, want 200: %s", r.code, r.err, r.body)
		}
		if decodeEcho(t, r.body).Unit != "eu-west-1" {
			t.Errorf("in-flight request answered by another unit: %s", r.body)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the in-flight request did not finish")
	}

	start := time.Now()
	resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a request to the stopped unit took %s", d)
	}
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("after shutdown: status %d, want 503: %s", resp.StatusCode, body)
	}
}

// An app that closes a kept-alive connection with a request on it (it
// restarted, or timed the connection out) does not fail a request that
// came over the mesh with an empty body: the sidecar sends it again on a
// new connection.
func TestAppClosedKeptAliveConnection(t *testing.T) {
	var mu sync.Mutex
	served := map[string]int{} // requests answered per app connection
	m := newMesh(t, meshOpts{app: func(id Identity) http.Handler {
		e := echo.Handler(echo.Info{Service: id.Service, Unit: id.Unit, Region: id.Region}, nil)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			n := served[r.RemoteAddr]
			served[r.RemoteAddr]++
			mu.Unlock()
			if n == 1 { // the second request of a connection: close it unanswered
				c, _, err := w.(http.Hijacker).Hijack()
				if err == nil {
					c.Close()
				}
				return
			}
			e.ServeHTTP(w, r)
		})
	}})
	c := &http.Client{Timeout: 10 * time.Second}
	for i := range 3 {
		resp, body := do(t, c, m.newReq("GET", "us-east-1", uidEUWest1, "/", nil))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s, want 200 (sent again on a new connection)", i, resp.StatusCode, body)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(served) < 2 {
		t.Fatalf("the app saw %d connections: no request met a closed one", len(served))
	}
}
