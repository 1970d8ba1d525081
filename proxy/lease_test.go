package proxy

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
)

// send sends method for uid to service echo through a sidecar's outbound
// port, with the header pairs hdr, and returns the status and the
// answer's headers.
func send(t *testing.T, outbound, method, uid string, hdr ...string) (int, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+outbound+"/accounts", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header
}

// I3 at the sidecar: a unit that holds no lease takes no writes for its
// shards, whether they come from another unit (inbound) or from its own
// app (the local path); reads go on, marked stale, unless they ask to be
// linearizable; writes elsewhere go on. A grant opens writes and unmarks
// reads; when it runs out they stop again.
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

	// check sends a request and wants its status, error kind and stale
	// mark; a read with linearizable asks for a linearizable read.
	check := func(what, outbound, method, uid string, linearizable bool, code int, kind, stale string) {
		t.Helper()
		var hdr []string
		if linearizable {
			hdr = []string{"x-cellmesh-consistency", "linearizable"}
		}
		c, h := send(t, outbound, method, uid, hdr...)
		if k, st := h.Get("x-cellmesh-error"), h.Get("x-cellmesh-stale"); c != code || k != kind || st != stale {
			t.Fatalf("%s: %s for %s answered %d %q (stale %q), want %d %q (stale %q)", what, method, uid, c, k, st, code, kind, stale)
		}
	}
	check("no lease yet, from another unit", peer, "POST", own, false, http.StatusServiceUnavailable, "no-lease", "")
	check("no lease yet, from its own app", x.addrs.Outbound, "POST", own, false, http.StatusServiceUnavailable, "no-lease", "")
	check("no lease yet, a read", peer, "GET", own, false, http.StatusOK, "", "no-lease")
	check("no lease yet, a linearizable read", peer, "GET", own, true, http.StatusServiceUnavailable, "no-lease", "")
	check("no lease yet, a linearizable read from its own app", x.addrs.Outbound, "GET", own, true, http.StatusServiceUnavailable, "no-lease", "")
	check("no lease yet, a write to another unit", x.addrs.Outbound, "POST", other, false, http.StatusOK, "", "")
	check("no lease yet, a read of another unit's shard", x.addrs.Outbound, "GET", other, true, http.StatusOK, "", "")

	grant := func(seq, ttlMillis uint64) {
		t.Helper()
		l := &cellmeshv1.Lease{Name: "us-east-1", Unit: "us-east-1", Seq: seq, TtlMillis: ttlMillis, GrantedUnixMillis: uint64(time.Now().UnixMilli())}
		if err := cp.leases.UpdateResource("us-east-1", l); err != nil {
			t.Fatal(err)
		}
		waitFor(t, xdsWait, func() bool { g := x.sc.lease.Load(); return g != nil && g.seq == seq }, "the grant")
	}
	grant(1, 60000)
	check("with a lease, from another unit", peer, "POST", own, false, http.StatusOK, "", "")
	check("with a lease, from its own app", x.addrs.Outbound, "PUT", own, false, http.StatusOK, "", "")
	check("with a lease, a read", peer, "GET", own, false, http.StatusOK, "", "")
	check("with a lease, a linearizable read", x.addrs.Outbound, "GET", own, true, http.StatusOK, "", "")

	// A short grant runs out: writes stop, with no word from the control
	// plane.
	grant(2, 700)
	waitFor(t, xdsWait, func() bool { return x.sc.LeaseRemaining() == 0 }, "the short lease to end")
	check("the lease ended", peer, "DELETE", own, false, http.StatusServiceUnavailable, "no-lease", "")
	check("the lease ended, a read", x.addrs.Outbound, "GET", own, false, http.StatusOK, "", "no-lease")
	check("the lease ended, a linearizable read", peer, "GET", own, true, http.StatusServiceUnavailable, "no-lease", "")
	if w, r := testutil.ToFloat64(x.sc.m.noLease.WithLabelValues("write")), testutil.ToFloat64(x.sc.m.noLease.WithLabelValues("read")); w != 3 || r != 3 {
		t.Fatalf("cellmesh_lease_refused_total = %v writes, %v reads, want 3 and 3", w, r)
	}
	if v := testutil.ToFloat64(x.sc.m.staleReads); v != 2 {
		t.Fatalf("cellmesh_stale_reads_total = %v, want 2", v)
	}
}

// freezeRelay carries TCP connections to a replica until frozen; frozen,
// it drops what either side sends without closing anything. cut() also
// stops accepting connections, as a partition does; frozen alone, it is a
// replica that is there but says nothing (no leader to renew leases).
type freezeRelay struct {
	ln       net.Listener
	frozen   atomic.Bool
	accepted atomic.Int64
}

func (r *freezeRelay) cut() {
	r.frozen.Store(true)
	r.ln.Close()
}

func newFreezeRelay(t *testing.T, target string) *freezeRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &freezeRelay{ln: ln}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				dst.Close()
				return
			}
			if !r.frozen.Load() {
				if _, err := dst.Write(buf[:n]); err != nil {
					return
				}
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.accepted.Add(1)
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, up)
			mu.Unlock()
			wg.Add(2)
			go pipe(up, c)
			go pipe(c, up)
		}
	}()
	return r
}

// A replica cut off (silent, and no new connection reaches it) is given up
// after half the lease's TTL, and the next one renews the lease before it
// runs out: gRPC's own pings would notice only after about 15 s. A replica
// that is only silent (reachable: waiting for a raft leader) is kept.
func TestXDSSilentReplicaGivenUpBeforeTheLeaseEnds(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	seq := uint64(0)
	// sidecar starts a sidecar of unit us-east-1 streaming through two
	// relays of its own, grants it a lease, and returns it with the relay
	// it streams through.
	sidecar := func() (*node, *freezeRelay, map[string]*freezeRelay) {
		relays := map[string]*freezeRelay{}
		var servers []string
		for range 2 {
			r := newFreezeRelay(t, cp.addr)
			relays[r.ln.Addr().String()] = r
			servers = append(servers, r.ln.Addr().String())
		}
		id := Identity{Region: "us-east", Unit: "us-east-1", Service: "echo"}
		x := xdsNode(t, m.ca, id, XDSConfig{Servers: servers}, nil)
		seq++
		grantTo(t, cp, x, seq)
		return x, relays[x.sc.xds.Load().snapshot().Server], relays
	}

	// Silent but reachable: kept.
	x, used, _ := sidecar()
	used.frozen.Store(true)
	probed := used.accepted.Load()
	waitFor(t, xdsWait, func() bool { return used.accepted.Load() > probed }, "a probe of the silent replica")
	if s := x.sc.xds.Load().snapshot(); x.logs.contains("nothing from the replica") || s.Server != used.ln.Addr().String() {
		t.Fatalf("a silent but reachable replica was given up (now on %s)", s.Server)
	}

	// Cut off: given up for the other, which renews the lease.
	x, used, _ = sidecar()
	used.cut()
	waitFor(t, xdsWait, func() bool {
		return x.logs.contains("nothing from the replica for 2s (half the lease's TTL) and a new connection to it failed")
	}, "the cut-off replica given up")
	waitFor(t, xdsWait, func() bool {
		s := x.sc.xds.Load().snapshot()
		return s.Connected && s.Server != used.ln.Addr().String()
	}, "a stream from the other replica")
	seq++
	grantTo(t, cp, x, seq)
}

// grantTo grants unit us-east-1 a 4 s lease with seq and waits until x
// holds it.
func grantTo(t *testing.T, cp *testCP, x *node, seq uint64) {
	t.Helper()
	l := &cellmeshv1.Lease{Name: "us-east-1", Unit: "us-east-1", Seq: seq, TtlMillis: 4000, GrantedUnixMillis: uint64(time.Now().UnixMilli())}
	if err := cp.leases.UpdateResource("us-east-1", l); err != nil {
		t.Fatal(err)
	}
	waitFor(t, xdsWait, func() bool { g := x.sc.lease.Load(); return g != nil && g.seq == seq }, fmt.Sprintf("grant %d", seq))
}
