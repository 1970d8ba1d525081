package proxy

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
)

// send sends method for uid to service echo through a sidecar's outbound
// port and returns the status and x-cellmesh-error.
func send(t *testing.T, outbound, method, uid string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+outbound+"/accounts", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("x-cellmesh-error")
}

// I3 at the sidecar: a unit that holds no lease takes no writes for its
// shards, whether they come from another unit (inbound) or from its own
// app (the local path); reads go on, and so do writes elsewhere. A grant
// opens writes; when it runs out they stop again.
func TestNoWritesWithoutLease(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	id := Identity{Region: "us-east", Unit: "us-east-1", Service: "echo"}
	app := m.nodes["us-east-1"].app.Listener.Addr().String()
	x := xdsNode(t, m.ca, id, XDSConfig{Servers: []string{cp.addr}}, func(c *Config) { c.App = app })
	// us-east-1's echo is reached at x from every unit.
	eps := m.endpoints()
	for i := range eps {
		if eps[i].Unit == "us-east-1" {
			eps[i].Address = x.addrs.InboundQUIC
		}
	}
	for _, u := range m.order {
		if err := m.nodes[u].sc.SetEndpoints(eps, 2); err != nil {
			t.Fatal(err)
		}
	}
	cp.publish(topo, eps)
	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready")
	peer := m.nodes["eu-west-1"].addrs.Outbound
	const own, other = "2088000000007", "2088000000057" // shards 7 (us-east-1) and 57 (eu-west-1)

	check := func(what, outbound, method, uid string, code int, kind string) {
		t.Helper()
		if c, k := send(t, outbound, method, uid); c != code || k != kind {
			t.Fatalf("%s: %s for %s answered %d %q, want %d %q", what, method, uid, c, k, code, kind)
		}
	}
	check("no lease yet, from another unit", peer, "POST", own, http.StatusServiceUnavailable, "no-lease")
	check("no lease yet, from its own app", x.addrs.Outbound, "POST", own, http.StatusServiceUnavailable, "no-lease")
	check("no lease yet, a read", peer, "GET", own, http.StatusOK, "")
	check("no lease yet, a write to another unit", x.addrs.Outbound, "POST", other, http.StatusOK, "")

	grant := func(seq, ttlMillis uint64) {
		t.Helper()
		l := &cellmeshv1.Lease{Name: "us-east-1", Unit: "us-east-1", Seq: seq, TtlMillis: ttlMillis, GrantedUnixMillis: uint64(time.Now().UnixMilli())}
		if err := cp.leases.UpdateResource("us-east-1", l); err != nil {
			t.Fatal(err)
		}
		waitFor(t, xdsWait, func() bool { g := x.sc.lease.Load(); return g != nil && g.seq == seq }, "the grant")
	}
	grant(1, 60000)
	check("with a lease, from another unit", peer, "POST", own, http.StatusOK, "")
	check("with a lease, from its own app", x.addrs.Outbound, "PUT", own, http.StatusOK, "")

	// A short grant runs out: writes stop, with no word from the control
	// plane.
	grant(2, 700)
	waitFor(t, xdsWait, func() bool { return x.sc.LeaseRemaining() == 0 }, "the short lease to end")
	check("the lease ended", peer, "DELETE", own, http.StatusServiceUnavailable, "no-lease")
	check("the lease ended, a read", x.addrs.Outbound, "GET", own, http.StatusOK, "")
	if v := testutil.ToFloat64(x.sc.m.noLease); v != 3 {
		t.Fatalf("cellmesh_lease_refused_writes_total = %v, want 3", v)
	}
}
