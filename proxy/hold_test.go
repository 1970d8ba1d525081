package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cellmesh/cellmesh/routing"
)

// draining returns topo's next version with shard draining.
func draining(topo *routing.Topology, version uint64, shard int) *routing.Topology {
	next := topo.Clone()
	next.Version = version
	for i := range next.Assignments {
		if next.Assignments[i].Shard == shard {
			next.Assignments[i].State = routing.StateDraining
		}
	}
	return next
}

// A planned handoff as the sidecars see it: while shard 7 drains, requests
// for it (a write, a read) are held at its owner; when the map moves the
// shard, they go once to the new owner and succeed: no error reaches the
// client. A handoff that does not end frees its held requests with a 503
// handoff and Retry-After.
func TestWritesHeldWhileDraining(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	us1, eu1 := m.nodes["us-east-1"], m.nodes["eu-west-1"]
	const uid = "2088000000007" // shard 7: us-east-1, standby eu-west-1
	send := func(method string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+eu1.addrs.Outbound+"/", strings.NewReader("x"))
		req.Host = "echo"
		req.Header.Set("x-cellmesh-uid", uid)
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(body)
	}

	v2 := draining(topo, 2, 7)
	m.setPeers(v2)
	type answer struct {
		resp *http.Response
		body string
	}
	done := make(chan answer, 2)
	for _, method := range []string{"POST", "GET"} {
		go func() {
			resp, body := send(method)
			done <- answer{resp, body}
		}()
	}
	waitFor(t, 10*time.Second, func() bool { return us1.sc.held.Load() == 2 }, "a write and a read held at us-east-1")
	select {
	case a := <-done:
		t.Fatalf("a request went on while the shard drained: %d %s", a.resp.StatusCode, a.body)
	default:
	}
	m.setPeers(moved(t, topo, 3, 7, "eu-west-1", 2))
	for range 2 {
		a := <-done
		if a.resp.StatusCode != 200 || decodeEcho(t, []byte(a.body)).Unit != "eu-west-1" {
			t.Fatalf("a held request after the handoff: %d %s, want 200 from eu-west-1", a.resp.StatusCode, a.body)
		}
	}
	if n := testutil.CollectAndCount(us1.sc.m.holdSeconds); n != 1 || us1.sc.held.Load() != 0 {
		t.Fatalf("hold histogram has %d series, %d still held", n, us1.sc.held.Load())
	}

	// A handoff that never ends: the held write is refused, with the way
	// out.
	m.setPeers(draining(moved(t, topo, 4, 7, "eu-west-1", 2), 4, 7))
	resp, body := send("PUT")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("x-cellmesh-error") != "handoff" || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("a write held past the bound: %d %v %s", resp.StatusCode, resp.Header, body)
	}
}
