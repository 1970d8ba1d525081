package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// moveShard returns a copy of topo, one version later, with shard moved to
// unit at epoch.
func moveShard(t *testing.T, topo *routing.Topology, shard int, unit string, epoch uint64) *routing.Topology {
	t.Helper()
	next := topo.Clone()
	next.Version++
	var out []routing.Assignment
	for _, a := range next.Assignments {
		if a.Shard == shard {
			old := a.Primary
			a.Primary, a.Epoch = unit, epoch
			sb := []string{}
			for _, s := range a.Standbys {
				if s != unit {
					sb = append(sb, s)
				}
			}
			if len(sb) == 0 && old != unit {
				sb = []string{old}
			}
			a.Standbys = sb
		}
		out = append(out, a)
	}
	next.Assignments = out
	return next
}

// A sender with an older epoch than the owner's is fenced with 421 and told
// the owner and epoch; a sender whose map points at a unit that no longer
// owns the shard is told the new owner.
func TestStaleEpochAndMisroute421(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()
	const uid = "2088123456707" // shard 7, us-east-1 at epoch 1

	// us-east-1 learns that shard 7 moved to eu-west-1 at epoch 2; eu-west-1
	// learns it too; us-east-2 still routes with the old map.
	moved := compile(t, moveShard(t, m.topo, 7, "eu-west-1", 2))
	for _, u := range []string{"us-east-1", "eu-west-1"} {
		if err := m.nodes[u].sc.SetMap(moved); err != nil {
			t.Fatal(err)
		}
	}
	resp, body := m.get(c, "us-east-2", uid, "/")
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("stale sender: status %d, want 421: %s", resp.StatusCode, body)
	}
	if got := resp.Header.Get("x-cellmesh-owner"); got != "eu-west-1" {
		t.Errorf("x-cellmesh-owner %q, want eu-west-1", got)
	}
	if got := resp.Header.Get("x-cellmesh-epoch"); got != "2" {
		t.Errorf("x-cellmesh-epoch %q, want 2", got)
	}
	if !strings.Contains(string(body), "owned by unit eu-west-1 at epoch 2") {
		t.Errorf("body does not say who owns the shard: %q", body)
	}
	if got := testutil.ToFloat64(m.nodes["us-east-1"].sc.m.fenced); got != 1 {
		t.Errorf("us-east-1 fenced %v requests, want 1", got)
	}

	// The same epoch but the wrong unit: eu-west-1 thinks it still owns
	// shard 7 at epoch 2, us-east-2 (updated) sends it there, fine; now make
	// us-east-1 the owner again at epoch 3 everywhere but eu-west-1's map.
	resp, body = m.get(c, "us-east-1", uid, "/")
	if resp.StatusCode != http.StatusOK || decodeEcho(t, body).Unit != "eu-west-1" {
		t.Fatalf("updated sender: status %d from %s, want 200 from eu-west-1: %s", resp.StatusCode, resp.Header.Get("x-cellmesh-unit"), body)
	}

	// The receiver's map is behind the sender's: 503 with Retry-After, not
	// a guess.
	ahead := compile(t, moveShard(t, moveShard(t, m.topo, 7, "eu-west-1", 2), 7, "eu-west-1", 3))
	if err := m.nodes["us-east-2"].sc.SetMap(ahead); err != nil {
		t.Fatal(err)
	}
	resp, body = m.get(c, "us-east-2", uid, "/")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || resp.Header.Get("x-cellmesh-error") != "map-behind" {
		t.Fatalf("receiver behind: status %d retry-after %q error %q, want 503 map-behind with Retry-After: %s",
			resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("x-cellmesh-error"), body)
	}
}

// With misroute correction on, a request sent to the old owner is forwarded
// once to the new one and answered there.
func TestMisrouteCorrection(t *testing.T) {
	m := newMesh(t, meshOpts{configure: func(c *Config) { c.MisrouteCorrection = true }})
	c := newClient()
	const uid = "31" // shard 31: us-east-2 at epoch 1
	moved := compile(t, moveShard(t, m.topo, 31, "eu-west-2", 2))
	for _, u := range []string{"us-east-2", "eu-west-2"} {
		if err := m.nodes[u].sc.SetMap(moved); err != nil {
			t.Fatal(err)
		}
	}
	resp, body := m.get(c, "eu-west-1", uid, "/")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200 after correction: %s", resp.StatusCode, body)
	}
	e := decodeEcho(t, body)
	if e.Unit != "eu-west-2" {
		t.Errorf("answered by %s, want eu-west-2 (the new owner)", e.Unit)
	}
	if got := e.Headers.Get("x-cellmesh-epoch"); got != "2" {
		t.Errorf("app saw epoch %q, want the owner's epoch 2", got)
	}
	if got := e.Headers.Get("x-cellmesh-origin-unit"); got != "us-east-2" {
		t.Errorf("app saw origin %q, want us-east-2 (the sidecar that corrected the route)", got)
	}
	if got := testutil.ToFloat64(m.nodes["us-east-2"].sc.m.misrouted.WithLabelValues("corrected")); got != 1 {
		t.Errorf("corrected misroutes = %v, want 1", got)
	}

	// A corrected request is not corrected twice: when the next owner
	// disagrees too, it answers 421.
	again := compile(t, moveShard(t, moveShard(t, m.topo, 31, "eu-west-2", 2), 31, "eu-west-1", 3))
	if err := m.nodes["eu-west-2"].sc.SetMap(again); err != nil {
		t.Fatal(err)
	}
	resp, body = m.get(c, "eu-west-1", uid, "/")
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("double misroute: status %d, want 421: %s", resp.StatusCode, body)
	}
}

// A receiver whose map is behind the sender's answers 503 map-behind; the
// sender holds the request and sends it again, so a receiver that catches
// up within the hold serves it: a move's push reaching the units in some
// order fails no request.
func TestMapBehindIsHeldUntilTheReceiverCatchesUp(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := newClient()
	const uid = "2088123456707" // shard 7, us-east-1 at epoch 1
	moved := compile(t, moveShard(t, m.topo, 7, "eu-west-1", 2))
	// The sender knows the move; the new owner does not yet.
	if err := m.nodes["us-east-2"].sc.SetMap(moved); err != nil {
		t.Fatal(err)
	}
	behindAnswers := func() float64 {
		return testutil.ToFloat64(m.nodes["eu-west-1"].sc.m.requests.WithLabelValues("inbound", "echo", "us-east-2", "eu-west-1", "rzone", "503", "false"))
	}
	type result struct {
		code int
		unit string
	}
	done := make(chan result, 1)
	go func() {
		resp, body := m.get(c, "us-east-2", uid, "/")
		r := result{code: resp.StatusCode}
		if resp.StatusCode == http.StatusOK {
			r.unit = decodeEcho(t, body).Unit
		}
		done <- r
	}()
	// Once the new owner has refused the request at least once, it learns
	// the move.
	waitFor(t, 10*time.Second, func() bool { return behindAnswers() >= 1 }, "a map-behind answer")
	if err := m.nodes["eu-west-1"].sc.SetMap(moved); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.code != http.StatusOK || r.unit != "eu-west-1" {
		t.Fatalf("held request: status %d from %q, want 200 from eu-west-1", r.code, r.unit)
	}
}

// A receiver whose map is behind holds the request (its body unread) for
// a moment and serves it once its map catches up: a POST, whose streamed
// body the sender could not send again, gets through a push in any order.
func TestMapBehindReceiverWaits(t *testing.T) {
	m := newMesh(t, meshOpts{})
	const uid = "2088123456707" // shard 7, us-east-1 at epoch 1
	moved := compile(t, moveShard(t, m.topo, 7, "eu-west-1", 2))
	if err := m.nodes["us-east-2"].sc.SetMap(moved); err != nil {
		t.Fatal(err)
	}
	eu1 := m.nodes["eu-west-1"]
	done := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest("POST", "http://"+m.nodes["us-east-2"].addrs.Outbound+"/", strings.NewReader("debit 100"))
		req.Host = "echo"
		req.Header.Set("x-cellmesh-uid", uid)
		resp, err := newClient().Do(req)
		if err != nil {
			t.Error(err)
			resp = &http.Response{StatusCode: 0, Body: http.NoBody}
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- resp
	}()
	waitFor(t, 10*time.Second, func() bool { return testutil.ToFloat64(eu1.sc.m.inflight.WithLabelValues("inbound")) == 1 }, "the request waiting at eu-west-1")
	if err := eu1.sc.SetMap(moved); err != nil {
		t.Fatal(err)
	}
	if resp := <-done; resp.StatusCode != http.StatusOK || resp.Header.Get("x-cellmesh-unit") != "eu-west-1" {
		t.Fatalf("a POST while the receiver's map was behind: %d from %q, want 200 from eu-west-1", resp.StatusCode, resp.Header.Get("x-cellmesh-unit"))
	}
}
