package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/cellmesh/cellmesh/examples/echo"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// xdsWait bounds every wait of the xDS tests.
const xdsWait = 20 * time.Second

// testCP is a control-plane replica as controlplane/xds builds it (a
// snapshot cache in ADS mode for the Envoy types, a linear cache for the
// shard map, muxed by type URL, behind go-control-plane's ADS server), on
// gRPC with mutual TLS. It records every request and response of its
// streams.
type testCP struct {
	t      *testing.T
	addr   string
	snaps  cache.SnapshotCache
	maps   *cache.LinearCache
	leases *cache.LinearCache
	srv    *grpc.Server
	done   chan struct{}

	mu    sync.Mutex
	reqs  []*discovery.DiscoveryRequest
	resps []*discovery.DiscoveryResponse
	opens int
	snap  int // last snapshot version published
}

// cpID is a control-plane replica's identity.
func cpID(replica string) meshtls.ID {
	return meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: replica, Service: meshtls.ControlPlaneService}
}

type meshHash struct{}

func (meshHash) ID(*core.Node) string { return "mesh" }

// newTestCP serves on addr ("127.0.0.1:0" for any port) with a
// certificate for id.
func newTestCP(t *testing.T, ca *testCA, id meshtls.ID, addr string) *testCP {
	t.Helper()
	cp := &testCP{
		t:      t,
		snaps:  cache.NewSnapshotCache(true, meshHash{}, nil),
		maps:   cache.NewLinearCache(xdsapi.ShardMapType),
		leases: cache.NewLinearCache(xdsapi.LeaseType),
		done:   make(chan struct{}),
	}
	isMap := func(typeURL string) string {
		switch typeURL {
		case xdsapi.ShardMapType:
			return "map"
		case xdsapi.LeaseType:
			return "lease"
		}
		return "envoy"
	}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return isMap(r.GetTypeUrl()) },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return isMap(r.GetTypeUrl()) },
		Caches:        map[string]cache.Cache{"map": cp.maps, "lease": cp.leases, "envoy": cp.snaps},
	}
	cb := server.CallbackFuncs{
		StreamOpenFunc: func(context.Context, int64, string) error {
			cp.mu.Lock()
			defer cp.mu.Unlock()
			cp.opens++
			return nil
		},
		StreamRequestFunc: func(_ int64, r *discovery.DiscoveryRequest) error {
			cp.mu.Lock()
			defer cp.mu.Unlock()
			cp.reqs = append(cp.reqs, proto.Clone(r).(*discovery.DiscoveryRequest))
			return nil
		},
		StreamResponseFunc: func(_ context.Context, _ int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
			cp.mu.Lock()
			defer cp.mu.Unlock()
			cp.resps = append(cp.resps, proto.Clone(r).(*discovery.DiscoveryResponse))
		},
	}
	store := ca.issue(id, time.Hour, nil)
	tc := store.ServerConfig(nil, nil)
	tc.NextProtos = []string{"h2"} // on the config itself: see ServerConfig
	cp.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	ctx, cancel := context.WithCancel(context.Background())
	discovery.RegisterAggregatedDiscoveryServiceServer(cp.srv, server.NewServer(ctx, mux, cb))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	cp.addr = ln.Addr().String()
	go func() {
		defer close(cp.done)
		cp.srv.Serve(ln)
	}()
	t.Cleanup(func() {
		cp.stop()
		cancel()
	})
	return cp
}

// stop ends the replica and its streams.
func (cp *testCP) stop() {
	cp.srv.Stop()
	<-cp.done
}

// publish serves topo and the endpoints eps as the next version.
func (cp *testCP) publish(topo *routing.Topology, eps []Endpoint) {
	cp.t.Helper()
	cp.publishEndpoints(topo, eps, nil)
	cp.publishMap(topo)
}

// publishMap serves topo as the shard map.
func (cp *testCP) publishMap(topo *routing.Topology) {
	cp.t.Helper()
	sm := xdsapi.FromTopology(topo)
	sm.Name = xdsapi.ShardMapName
	if err := cp.maps.UpdateResource(xdsapi.ShardMapName, sm); err != nil {
		cp.t.Fatal(err)
	}
}

// publishEndpoints serves a snapshot of the next version with a cluster
// and a load assignment for every service and unit of eps, as
// controlplane/xds Build makes them; the localities' regions come from
// topo. edit, when not nil, changes each assignment before it is served.
func (cp *testCP) publishEndpoints(topo *routing.Topology, eps []Endpoint, edit func(*endpointv3.ClusterLoadAssignment)) {
	cp.t.Helper()
	region := map[string]string{}
	for _, u := range topo.Units {
		region[u.Name] = u.Region
	}
	groups := map[string][]Endpoint{}
	for _, e := range eps {
		name := xdsapi.ClusterName(e.Service, e.Unit)
		groups[name] = append(groups[name], e)
	}
	var clusters, clas []types.Resource
	for _, name := range slices.Sorted(maps.Keys(groups)) {
		clusters = append(clusters, &cluster.Cluster{
			Name:                 name,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
			EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{EdsConfig: &core.ConfigSource{
				ResourceApiVersion:    core.ApiVersion_V3,
				ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
			}},
		})
		unit := groups[name][0].Unit
		var lbs []*endpointv3.LbEndpoint
		for _, e := range groups[name] {
			ap := netip.MustParseAddrPort(e.Address)
			tr := e.Transport
			if tr == "" {
				tr = QUIC
			}
			lbs = append(lbs, &endpointv3.LbEndpoint{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &core.Address{
					Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
						Address: ap.Addr().String(), PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
					}},
				}}},
				Metadata: &core.Metadata{FilterMetadata: map[string]*structpb.Struct{
					"cellmesh": {Fields: map[string]*structpb.Value{"transport": structpb.NewStringValue(string(tr))}},
				}},
			})
		}
		cla := &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			Locality: &core.Locality{Region: region[unit], Zone: unit}, LbEndpoints: lbs,
		}}}
		if edit != nil {
			edit(cla)
		}
		clas = append(clas, cla)
	}
	cp.mu.Lock()
	cp.snap++
	version := strconv.Itoa(cp.snap)
	cp.mu.Unlock()
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ClusterType: clusters, resource.EndpointType: clas,
	})
	if err != nil {
		cp.t.Fatal(err)
	}
	if err := snap.Consistent(); err != nil {
		cp.t.Fatal(err)
	}
	if err := cp.snaps.SetSnapshot(context.Background(), "mesh", snap); err != nil {
		cp.t.Fatal(err)
	}
}

func (cp *testCP) requests() []*discovery.DiscoveryRequest {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return slices.Clone(cp.reqs)
}

func (cp *testCP) streams() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.opens
}

// waitRequest waits for a request that ok accepts and returns it.
func (cp *testCP) waitRequest(what string, ok func(*discovery.DiscoveryRequest) bool) *discovery.DiscoveryRequest {
	cp.t.Helper()
	var got *discovery.DiscoveryRequest
	waitFor(cp.t, xdsWait, func() bool {
		for _, r := range cp.requests() {
			if ok(r) {
				got = r
				return true
			}
		}
		return false
	}, what)
	return got
}

// mapResponse returns the last response that carried the shard map of
// topology version v.
func (cp *testCP) mapResponse(v uint64) *discovery.DiscoveryResponse {
	cp.t.Helper()
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for i := len(cp.resps) - 1; i >= 0; i-- {
		r := cp.resps[i]
		if r.GetTypeUrl() != xdsapi.ShardMapType || len(r.GetResources()) != 1 {
			continue
		}
		var sm cellmeshv1.ShardMap
		if err := r.GetResources()[0].UnmarshalTo(&sm); err != nil {
			cp.t.Fatal(err)
		}
		if sm.GetVersion() == v {
			return r
		}
	}
	cp.t.Fatalf("no response carried shard map version %d", v)
	return nil
}

// waitNACK waits for a NACK of typeURL whose reason says want.
func (cp *testCP) waitNACK(typeURL, want string) *discovery.DiscoveryRequest {
	cp.t.Helper()
	return cp.waitRequest("a NACK of "+xdsShort(typeURL)+" saying "+want, func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == typeURL && r.GetErrorDetail() != nil && strings.Contains(r.GetErrorDetail().GetMessage(), want)
	})
}

// xdsNode runs a sidecar for id whose map and endpoints come from xDS
// with cfg. configure changes its Config before New.
func xdsNode(t *testing.T, ca *testCA, id Identity, cfg XDSConfig, configure func(*Config)) *node {
	t.Helper()
	n := &node{id: id, reg: prometheus.NewRegistry(), logs: &syncBuffer{}}
	c := Config{
		Identity: id, App: freeAddr(t), TLS: ca.issue(meshID(id), time.Hour, nil),
		Outbound: "127.0.0.1:0", InboundQUIC: "127.0.0.1:0", Admin: Off,
		Logger:   slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry: n.reg, Retries: -1, DrainTimeout: 10 * time.Second,
	}
	if configure != nil {
		configure(&c)
	}
	sc, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Listen(); err != nil {
		t.Fatal(err)
	}
	n.sc, n.addrs = sc, sc.Addrs()
	if cfg.BackoffMin == 0 {
		cfg.BackoffMin, cfg.BackoffMax = 10*time.Millisecond, 200*time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.stop, n.done = cancel, make(chan error, 1)
	xdsDone := make(chan error, 1)
	go func() { xdsDone <- sc.RunXDS(ctx, cfg) }()
	go func() { n.done <- sc.Run(ctx) }()
	t.Cleanup(func() {
		n.shutdown(t)
		select {
		case err := <-xdsDone:
			if err != nil {
				t.Errorf("RunXDS: %v", err)
			}
		case <-time.After(xdsWait):
			t.Errorf("RunXDS did not return within %s of its context's end", xdsWait)
		}
	})
	return n
}

// clientID is the sidecar under test: another service in unit us-east-1,
// calling the mesh's echo.
var clientID = Identity{Region: "us-east", Unit: "us-east-1", Service: "client"}

// unitOf returns the unit whose echo answered uid through n, or a
// description of the failure.
func unitOf(n *node, uid string) string {
	req, err := http.NewRequest("GET", "http://"+n.addrs.Outbound+"/", nil)
	if err != nil {
		return err.Error()
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return resp.Status
	}
	var r echo.Response
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return err.Error()
	}
	return r.Unit
}

// waitRoute waits until uid goes through n to unit.
func waitRoute(t *testing.T, n *node, uid, unit string) {
	t.Helper()
	last := ""
	waitFor(t, xdsWait, func() bool { last = unitOf(n, uid); return last == unit },
		"uid "+uid+" to reach "+unit+" (last answer: "+last+")")
}

// moved returns topo's next version with shard on primary at epoch.
func moved(t *testing.T, topo *routing.Topology, version uint64, shard int, primary string, epoch uint64) *routing.Topology {
	t.Helper()
	next := topo.Clone()
	next.Version = version
	for i := range next.Assignments {
		a := &next.Assignments[i]
		if a.Shard == shard {
			old := a.Primary
			a.Primary, a.Epoch = primary, epoch
			a.Standbys = slices.DeleteFunc(a.Standbys, func(s string) bool { return s == primary })
			if old != primary {
				a.Standbys = append(a.Standbys, old)
			}
		}
	}
	return next
}

// epochOf is the epoch of shard in topo.
func epochOf(topo *routing.Topology, shard int) uint64 {
	for _, a := range topo.Assignments {
		if a.Shard == shard {
			return a.Epoch
		}
	}
	return 0
}

// withoutUnit returns topo's next version without unit: its shards move to
// heir at a new epoch, and every standby it was is replaced by a unit of
// the other region.
func withoutUnit(topo *routing.Topology, version uint64, unit, heir string) *routing.Topology {
	region := map[string]string{}
	for _, u := range topo.Units {
		region[u.Name] = u.Region
	}
	next := topo.Clone()
	next.Version = version
	next.Units = slices.DeleteFunc(next.Units, func(u routing.Unit) bool { return u.Name == unit })
	for i := range next.Assignments {
		a := &next.Assignments[i]
		if a.Primary == unit {
			a.Primary, a.Epoch = heir, a.Epoch+1
		}
		a.Standbys = slices.DeleteFunc(a.Standbys, func(s string) bool { return s == unit || s == a.Primary })
		if len(a.Standbys) == 0 {
			for _, u := range next.Units {
				if u.Region != region[a.Primary] {
					a.Standbys = []string{u.Name}
					break
				}
			}
		}
	}
	return next
}

// expand returns topo with one assignment per shard, so that moved can
// move a single one.
func expand(t *testing.T, topo *routing.Topology) *routing.Topology {
	t.Helper()
	return compile(t, topo).Topology()
}

// setPeers gives every sidecar of the mesh the map of topo, as their own
// control plane would.
func (m *mesh) setPeers(topo *routing.Topology) {
	m.t.Helper()
	sm := compile(m.t, topo)
	for _, u := range m.order {
		if err := m.nodes[u].sc.SetMap(sm); err != nil {
			m.t.Fatal(err)
		}
	}
}

func xdsUpdates(n *node, typ, result string) float64 {
	return testutil.ToFloat64(n.sc.m.xdsUpdates.WithLabelValues(typ, result))
}

func endpointsOf(n *node) []Endpoint {
	var eps []Endpoint
	for _, e := range n.sc.Status().Endpoints {
		eps = append(eps, e.Endpoint)
	}
	return eps
}

func sorted(eps []Endpoint) []Endpoint {
	eps = slices.Clone(eps)
	for i := range eps {
		if eps[i].Transport == "" {
			eps[i].Transport = QUIC
		}
	}
	sort.Slice(eps, func(i, j int) bool {
		a, b := eps[i], eps[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		if a.Unit != b.Unit {
			return a.Unit < b.Unit
		}
		return a.Address < b.Address
	})
	return eps
}

// The sidecar takes its map and endpoints from a real ADS stream, routes
// real traffic with them, ACKs them, and follows what is pushed next: a
// shard moved at a new epoch, an endpoint now reached over HTTP/2.
func TestXDSRoutesWithWhatIsPushed(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}}, nil)

	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready with the first map")
	for uid, unit := range map[string]string{"7": "us-east-1", "30": "us-east-2", "60": "eu-west-1", "80": "eu-west-2"} {
		if got := unitOf(x, uid); got != unit {
			t.Errorf("uid %s went to %q, want %s", uid, got, unit)
		}
	}
	if got, want := endpointsOf(x), sorted(m.endpoints()); !slices.Equal(got, want) {
		t.Errorf("endpoints %v, want %v", got, want)
	}
	waitFor(t, xdsWait, func() bool {
		st := x.sc.Status().XDS
		return st != nil && st.Connected && st.Server == cp.addr && st.Versions[xdsCluster] == "1" && st.Versions[xdsEndpoint] == "1" && st.Versions[xdsShardMap] != ""
	}, "/config to show the stream and the versions accepted")
	// The map's ACK: its version and nonce, no error.
	r1 := cp.mapResponse(1)
	cp.waitRequest("the ACK of map version 1", func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xdsapi.ShardMapType && r.GetResponseNonce() == r1.GetNonce() && r.GetVersionInfo() == r1.GetVersionInfo() && r.GetErrorDetail() == nil
	})

	// Shard 7 moves to eu-west-1 at epoch 2 (the peers hear it first).
	v2 := moved(t, topo, 2, 7, "eu-west-1", epochOf(topo, 7)+1)
	m.setPeers(v2)
	cp.publish(v2, m.endpoints())
	waitRoute(t, x, "7", "eu-west-1")
	if v := x.sc.Map().Version(); v != 2 {
		t.Errorf("map version %d, want 2", v)
	}
	if got := unitOf(x, "8"); got != "us-east-1" {
		t.Errorf("uid 8 (shard 8 did not move) went to %q, want us-east-1", got)
	}

	// eu-west-2 is now reached over HTTP/2 on TLS.
	cp.publish(v2, m.endpoints("eu-west-2"))
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), sorted(m.endpoints("eu-west-2"))) }, "the endpoints over h2")
	if got := unitOf(x, "80"); got != "eu-west-2" {
		t.Errorf("uid 80 went to %q over h2, want eu-west-2", got)
	}

	if n := xdsUpdates(x, xdsShardMap, "nack") + xdsUpdates(x, xdsEndpoint, "nack") + xdsUpdates(x, xdsCluster, "nack"); n != 0 {
		t.Errorf("%v NACKs, want none", n)
	}
	// Counted once applied, so just after the change shows.
	waitFor(t, xdsWait, func() bool {
		return xdsUpdates(x, xdsShardMap, "ack") >= 2 && xdsUpdates(x, xdsEndpoint, "ack") >= 3 && xdsUpdates(x, xdsCluster, "ack") >= 3
	}, "ACKs counted: at least 2 maps, 3 endpoint lists, 3 cluster lists")
	if v := testutil.ToFloat64(x.sc.m.xdsConnected); v != 1 {
		t.Errorf("cellmesh_xds_connected %v, want 1", v)
	}
	problems, err := testutil.GatherAndLint(x.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric %s: %s", p.Metric, p.Text)
	}
}

// A map the sidecar cannot apply is refused with the reason in the NACK's
// error_detail, the version it keeps and the nonce of the response; traffic
// keeps flowing on the last good map. So is an endpoint list it cannot use.
func TestXDSRefusesWhatItCannotApply(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}}, nil)
	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready with the first map")
	good := cp.mapResponse(1)
	waitRoute(t, x, "7", "us-east-1")

	noUnit := moved(t, topo, 3, 7, "us-west-9", epochOf(topo, 7)+1)
	lacksSelf := withoutUnit(topo, 4, "us-east-1", "us-east-2")
	nacks := 0
	for _, tc := range []struct {
		name string
		topo *routing.Topology
		want string
	}{
		{"primary-change-without-epoch", moved(t, topo, 2, 7, "eu-west-1", epochOf(topo, 7)), "shard 7: primary changes from us-east-1 to eu-west-1 at the same epoch"},
		{"does-not-compile", noUnit, "does not compile"},
		{"lacks-the-sidecar-unit", lacksSelf, "does not declare this sidecar's unit us-east-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp.publishMap(tc.topo)
			nack := cp.waitNACK(xdsapi.ShardMapType, tc.want)
			nacks++
			if c := codes.Code(nack.GetErrorDetail().GetCode()); c != codes.InvalidArgument {
				t.Errorf("NACK code %s, want InvalidArgument", c)
			}
			if nack.GetVersionInfo() != good.GetVersionInfo() {
				t.Errorf("NACK version_info %q, want the version kept, %q", nack.GetVersionInfo(), good.GetVersionInfo())
			}
			if bad := cp.mapResponse(tc.topo.Version); nack.GetResponseNonce() != bad.GetNonce() {
				t.Errorf("NACK nonce %q, want the refused response's %q", nack.GetResponseNonce(), bad.GetNonce())
			}
			if v := x.sc.Map().Version(); v != 1 {
				t.Errorf("map version %d after the NACK, want 1 kept", v)
			}
			if got := unitOf(x, "7"); got != "us-east-1" {
				t.Errorf("uid 7 went to %q after the NACK, want us-east-1 on the kept map", got)
			}
			if v := xdsUpdates(x, xdsShardMap, "nack"); v != float64(nacks) {
				t.Errorf("%v shard map NACKs counted, want %d", v, nacks)
			}
		})
	}

	// A good version after them is taken.
	v5 := moved(t, topo, 5, 7, "eu-west-1", epochOf(topo, 7)+1)
	m.setPeers(v5)
	cp.publishMap(v5)
	waitRoute(t, x, "7", "eu-west-1")

	// An older version than the one in use is refused too.
	cp.publishMap(topo)
	cp.waitNACK(xdsapi.ShardMapType, "shard map version 1 is older than the current version 5")
	if got := unitOf(x, "7"); got != "eu-west-1" {
		t.Errorf("uid 7 went to %q after the stale map, want eu-west-1", got)
	}
	if !x.logs.contains("xds update refused") {
		t.Error("the NACK was not logged")
	}

	// An endpoint the sidecar cannot use: the endpoints in use stay.
	cp.publishEndpoints(v5, m.endpoints(), func(cla *endpointv3.ClusterLoadAssignment) {
		if strings.HasSuffix(cla.ClusterName, "|eu-west-2") {
			cla.Endpoints[0].LbEndpoints[0].Metadata.FilterMetadata["cellmesh"].Fields["transport"] = structpb.NewStringValue("tcp")
		}
	})
	nack := cp.waitNACK(resource.EndpointType, `transport "tcp" is unknown`)
	if !strings.Contains(nack.GetErrorDetail().GetMessage(), "cellmesh|echo|eu-west-2") {
		t.Errorf("endpoint NACK %q does not name the cluster", nack.GetErrorDetail().GetMessage())
	}
	if got := unitOf(x, "80"); got != "eu-west-2" {
		t.Errorf("uid 80 went to %q after the endpoint NACK, want eu-west-2 on the kept endpoints", got)
	}
	if got, want := endpointsOf(x), sorted(m.endpoints()); !slices.Equal(got, want) {
		t.Errorf("endpoints %v after the NACK, want %v kept", got, want)
	}
	// Fixed in the next version, taken.
	cp.publishEndpoints(v5, m.endpoints("eu-west-2"), nil)
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), sorted(m.endpoints("eu-west-2"))) }, "the fixed endpoints")
}

// The sidecar registers itself through its node: service, unit, region,
// the bound address of the listener it advertises and its transport.
func TestXDSNodeRegistration(t *testing.T) {
	ca := newTestCA(t, trustDomain)
	for _, tr := range []Transport{QUIC, H2} {
		t.Run(string(tr), func(t *testing.T) {
			cp := newTestCP(t, ca, cpID("cp-1"), "127.0.0.1:0")
			id := Identity{Region: "eu-west", Unit: "eu-west-2", Service: "ledger"}
			x := xdsNode(t, ca, id, XDSConfig{Servers: []string{cp.addr}, Advertise: tr}, func(c *Config) { c.InboundTCP = "127.0.0.1:0" })
			first := cp.waitRequest("the first request", func(r *discovery.DiscoveryRequest) bool { return r.GetNode() != nil })
			addr := x.addrs.InboundQUIC
			if tr == H2 {
				addr = x.addrs.InboundTCP
			}
			if strings.HasSuffix(addr, ":0") || addr == "" {
				t.Fatalf("advertised listener address %q is not bound", addr)
			}
			n := first.GetNode()
			if n.GetId() != "eu-west-2/ledger/"+addr || n.GetCluster() != "ledger" ||
				n.GetLocality().GetRegion() != "eu-west" || n.GetLocality().GetZone() != "eu-west-2" {
				t.Errorf("node id %q cluster %q locality %v; want eu-west-2/ledger/%s, ledger, eu-west/eu-west-2", n.GetId(), n.GetCluster(), n.GetLocality(), addr)
			}
			want := map[string]string{xdsapi.MetaService: "ledger", xdsapi.MetaUnit: "eu-west-2", xdsapi.MetaRegion: "eu-west",
				xdsapi.MetaAddress: addr, xdsapi.MetaTransport: string(tr)}
			for k, v := range want {
				if got := n.GetMetadata().GetFields()[k].GetStringValue(); got != v {
					t.Errorf("node metadata %s = %q, want %q", k, got, v)
				}
			}
			// The first requests: every cluster, the map by name, and no
			// endpoint request while no cluster is known.
			asked := map[string][]string{}
			for _, r := range cp.requests() {
				asked[r.GetTypeUrl()] = r.GetResourceNames()
			}
			if names, ok := asked[resource.ClusterType]; !ok || len(names) != 0 {
				t.Errorf("cluster request names %q (asked: %v), want a wildcard", names, ok)
			}
			if names := asked[xdsapi.ShardMapType]; !slices.Equal(names, []string{xdsapi.ShardMapName}) {
				t.Errorf("shard map request names %q, want [%s]", names, xdsapi.ShardMapName)
			}
			if _, ok := asked[resource.EndpointType]; ok {
				t.Error("an endpoint request before any cluster is known (it would ask for every endpoint)")
			}
			if x.sc.Ready() {
				t.Error("ready without a map")
			}
		})
	}
}

// Two replicas: when the one streaming stops, the sidecar moves to the
// other, telling it the versions it holds, and takes its newer map; with
// no replica left it keeps routing on the last map.
func TestXDSFailover(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	bAddr := freeAddr(t)
	a := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	a.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{a.addr, bAddr}}, nil)
	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready with the first map")
	waitRoute(t, x, "7", "us-east-1")
	waitFor(t, xdsWait, func() bool { st := x.sc.Status().XDS; return st.Server == a.addr && st.Versions[xdsShardMap] != "" },
		"the stream with replica a")
	held := x.sc.Status().XDS.Versions

	v2 := moved(t, topo, 2, 7, "eu-west-1", epochOf(topo, 7)+1)
	m.setPeers(v2)
	b := newTestCP(t, m.ca, cpID("cp-2"), bAddr)
	b.publish(v2, m.endpoints())
	a.stop()
	waitRoute(t, x, "7", "eu-west-1")
	waitFor(t, xdsWait, func() bool { return x.sc.Status().XDS.Server == b.addr }, "the stream with replica b")

	// b was told what the sidecar held.
	firstOf := func(typ string) *discovery.DiscoveryRequest {
		return b.waitRequest("b's first "+xdsShort(typ)+" request", func(r *discovery.DiscoveryRequest) bool { return r.GetTypeUrl() == typ })
	}
	if r := firstOf(xdsapi.ShardMapType); r.GetVersionInfo() != held[xdsShardMap] || r.GetResponseNonce() != "" {
		t.Errorf("first shard map request to b: version %q nonce %q, want the version held %q and no nonce", r.GetVersionInfo(), r.GetResponseNonce(), held[xdsShardMap])
	}
	if r := firstOf(resource.ClusterType); r.GetVersionInfo() != held[xdsCluster] {
		t.Errorf("first cluster request to b: version %q, want %q", r.GetVersionInfo(), held[xdsCluster])
	}
	var clusters []string
	for _, e := range m.endpoints() {
		clusters = append(clusters, xdsapi.ClusterName(e.Service, e.Unit))
	}
	slices.Sort(clusters)
	if r := firstOf(resource.EndpointType); r.GetVersionInfo() != held[xdsEndpoint] || !slices.Equal(r.GetResourceNames(), clusters) {
		t.Errorf("first endpoint request to b: version %q names %q, want %q and %q", r.GetVersionInfo(), r.GetResourceNames(), held[xdsEndpoint], clusters)
	}
	if v := testutil.ToFloat64(x.sc.m.xdsReconnects); v < 1 {
		t.Errorf("cellmesh_xds_reconnects_total %v, want at least 1", v)
	}

	// No replica at all: the sidecar routes on what it has.
	b.stop()
	waitFor(t, xdsWait, func() bool { return testutil.ToFloat64(x.sc.m.xdsConnected) == 0 }, "cellmesh_xds_connected to fall to 0")
	if st := x.sc.Status().XDS; st.Connected || st.Server != "" || st.LastError == "" {
		t.Errorf("/config xds %+v with no replica up: want not connected, no server, the last error", st)
	}
	for uid, unit := range map[string]string{"7": "eu-west-1", "8": "us-east-1", "60": "eu-west-1", "80": "eu-west-2"} {
		if got := unitOf(x, uid); got != unit {
			t.Errorf("with no control plane: uid %s went to %q, want %s", uid, got, unit)
		}
	}
	if !x.sc.Ready() || x.sc.Map().Version() != 2 {
		t.Errorf("with no control plane: ready %v, map version %d; want ready on version 2", x.sc.Ready(), x.sc.Map().Version())
	}
}

// A server whose certificate is not the control plane's is refused in the
// handshake: no stream is opened, nothing is taken from it.
func TestXDSRefusesServerNotControlPlane(t *testing.T) {
	ca := newTestCA(t, trustDomain)
	impostor := newTestCP(t, ca, meshtls.ID{TrustDomain: trustDomain, Region: "us-east", Unit: "us-east-2", Service: "echo"}, "127.0.0.1:0")
	impostor.publish(localTopology(t), nil)
	x := xdsNode(t, ca, clientID, XDSConfig{Servers: []string{impostor.addr}}, nil)
	waitFor(t, xdsWait, func() bool { return tlsRejected(x, "xds", string(meshtls.ReasonUnauthorized)) >= 2 },
		"the impostor refused twice (it is tried again)")
	if n := impostor.streams(); n != 0 {
		t.Errorf("the impostor got %d streams", n)
	}
	if x.sc.Map() != nil || x.sc.Ready() {
		t.Error("a map was taken from the impostor")
	}
	if st := x.sc.Status().XDS; st.Connected || !strings.Contains(st.LastError, meshtls.ControlPlaneService) {
		t.Errorf("/config xds %+v: want not connected and the reason", st)
	}
	if !x.logs.contains("peer certificate refused") {
		t.Error("the refusal was not logged")
	}
}

// Endpoints the control plane drops for a unit the map in use still
// declares stay until the next map is handled (the two may come in either
// order); endpoints of a unit the map does not declare yet are taken at
// once, ready for the map that adds it.
func TestXDSEndpointsFollowTheMap(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}, holdTimeout: time.Hour}, nil)
	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready with the first map")
	all := sorted(m.endpoints())
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), all) }, "every endpoint")

	// Endpoints without eu-west-2 (and with one of a new unit); no map yet.
	var kept []Endpoint
	for _, e := range m.endpoints() {
		if e.Unit != "eu-west-2" {
			kept = append(kept, e)
		}
	}
	newUnit := Endpoint{Service: "echo", Unit: "us-east-3", Address: "127.0.0.1:9", Transport: QUIC}
	cp.publishEndpoints(topo, append(slices.Clone(kept), newUnit), nil)
	withNew := sorted(append(slices.Clone(m.endpoints()), newUnit))
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), withNew) },
		"the new unit's endpoint taken, eu-west-2's held for the map that still routes there")
	if got := unitOf(x, "80"); got != "eu-west-2" {
		t.Errorf("uid 80 went to %q while its unit's endpoints are held, want eu-west-2", got)
	}

	// The map that adds us-east-3 and drops eu-west-2 (its shards moved).
	v2 := withoutUnit(topo, 2, "eu-west-2", "eu-west-1")
	v2.Units = append(v2.Units, routing.Unit{Name: "us-east-3", Region: "us-east", Kind: routing.KindRZone, CapacityRPS: 5000})
	m.setPeersExcept(v2, "eu-west-2")
	cp.publishMap(v2)
	want := sorted(append(slices.Clone(kept), newUnit))
	waitFor(t, xdsWait, func() bool { return x.sc.Map().Version() == 2 && slices.Equal(endpointsOf(x), want) },
		"map version 2, and eu-west-2's endpoints dropped with it")
	waitRoute(t, x, "80", "eu-west-1")
}

// Endpoints held for a map that does not come are dropped after a while:
// the unit's instances are gone, and the map has not changed.
func TestXDSEndpointsHeldNotForever(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}, holdTimeout: 50 * time.Millisecond}, nil)
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), sorted(m.endpoints())) }, "every endpoint")
	var kept []Endpoint
	for _, e := range m.endpoints() {
		if e.Unit != "eu-west-2" {
			kept = append(kept, e)
		}
	}
	cp.publishEndpoints(topo, kept, nil)
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), sorted(kept)) }, "eu-west-2's endpoints dropped without a new map")
	waitFor(t, xdsWait, func() bool { return x.logs.contains("dropping the endpoints held") }, "the drop logged")
	if v := x.sc.Map().Version(); v != 1 {
		t.Errorf("map version %d, want 1", v)
	}
}

// Endpoints served UNHEALTHY (gossip finds their sidecar dead) leave the
// pool at once, even when their cluster has no healthy one left: no hold
// (the hold is for a cluster that vanished with a map still routing to
// it). Healthy again, they are back.
func TestXDSUnhealthyEndpointsDropAtOnce(t *testing.T) {
	m := newMesh(t, meshOpts{})
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}, holdTimeout: time.Hour}, nil)
	all := sorted(m.endpoints())
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), all) }, "every endpoint")
	var kept []Endpoint
	for _, e := range m.endpoints() {
		if e.Unit != "eu-west-2" {
			kept = append(kept, e)
		}
	}
	for _, st := range []core.HealthStatus{core.HealthStatus_UNHEALTHY, core.HealthStatus_DRAINING, core.HealthStatus_TIMEOUT} {
		cp.publishHealth(topo, m.endpoints(), "eu-west-2", st)
		waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), sorted(kept)) }, "eu-west-2's "+st.String()+" endpoints dropped")
		cp.publishEndpoints(topo, m.endpoints(), nil)
		waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), all) }, "eu-west-2's endpoints back")
	}
}

// A peer the control plane finds dead (UNHEALTHY, TIMEOUT) has its
// connections closed: a request in flight to it fails at once with the
// exchange broken (502 upstream), not at its 15 s timeout (504). A
// DRAINING peer keeps them: a request in flight to it finishes.
func TestXDSDeadPeerConnectionsClosed(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	m := newMesh(t, meshOpts{app: func(id Identity) http.Handler {
		if id.Unit != "eu-west-2" {
			return nil
		}
		echoH := echo.Handler(echo.Info{Service: id.Service, Unit: id.Unit, Region: id.Region}, nil)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/hang" {
				entered <- struct{}{}
				select {
				case <-release:
				case <-r.Context().Done():
				}
			}
			echoH.ServeHTTP(w, r)
		})
	}})
	t.Cleanup(func() { close(release) })
	topo := expand(t, m.topo)
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}, holdTimeout: time.Hour}, nil)
	all := sorted(m.endpoints())
	waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), all) }, "every endpoint")
	waitRoute(t, x, "80", "eu-west-2")
	// hang sends a request to eu-west-2 that its app holds, and returns
	// its answer's status and error kind once the app has it.
	hang := func() <-chan [2]string {
		out := make(chan [2]string, 1)
		go func() {
			req, _ := http.NewRequest("GET", "http://"+x.addrs.Outbound+"/hang", nil)
			req.Host = "echo"
			req.Header.Set("x-cellmesh-uid", "80")
			resp, err := (&http.Client{Timeout: time.Minute}).Do(req)
			if err != nil {
				out <- [2]string{err.Error(), ""}
				return
			}
			resp.Body.Close()
			out <- [2]string{strconv.Itoa(resp.StatusCode), resp.Header.Get("x-cellmesh-error")}
		}()
		<-entered
		return out
	}
	for _, st := range []core.HealthStatus{core.HealthStatus_UNHEALTHY, core.HealthStatus_TIMEOUT} {
		answer := hang()
		cp.publishHealth(topo, m.endpoints(), "eu-west-2", st)
		if got := <-answer; got != [2]string{"502", "upstream"} {
			t.Fatalf("a request in flight to a peer served %s: %v, want 502 upstream (its connection closed)", st, got)
		}
		cp.publishEndpoints(topo, m.endpoints(), nil)
		waitFor(t, xdsWait, func() bool { return slices.Equal(endpointsOf(x), all) }, "eu-west-2's endpoints back")
		waitRoute(t, x, "80", "eu-west-2") // a new connection
	}
	answer := hang()
	cp.publishHealth(topo, m.endpoints(), "eu-west-2", core.HealthStatus_DRAINING)
	waitFor(t, xdsWait, func() bool { return !slices.Equal(endpointsOf(x), all) }, "eu-west-2 draining, out of the pool")
	release <- struct{}{}
	if got := <-answer; got != [2]string{"200", ""} {
		t.Fatalf("a request in flight to a draining peer: %v, want 200", got)
	}
}

// publishHealth publishes eps with the endpoints of unit served with
// health status st.
func (cp *testCP) publishHealth(topo *routing.Topology, eps []Endpoint, unit string, st core.HealthStatus) {
	cp.t.Helper()
	cp.publishEndpoints(topo, eps, func(cla *endpointv3.ClusterLoadAssignment) {
		if _, u, _ := xdsapi.ParseClusterName(cla.GetClusterName()); u == unit {
			for _, lb := range cla.Endpoints[0].LbEndpoints {
				lb.HealthStatus = st
			}
		}
	})
}

// A control plane that serves a map but no clusters: the map waits for
// them a while (as Envoy's initial fetch timeout), then is applied.
func TestXDSMapWithoutClusters(t *testing.T) {
	ca := newTestCA(t, trustDomain)
	cp := newTestCP(t, ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publishMap(localTopology(t))
	x := xdsNode(t, ca, clientID, XDSConfig{Servers: []string{cp.addr}, warmTimeout: 50 * time.Millisecond}, nil)
	waitFor(t, xdsWait, x.sc.Ready, "the sidecar ready with the map alone")
	if !x.logs.contains("applying the shard map before the endpoints of every cluster arrived") {
		t.Error("the early map was not logged")
	}
	waitFor(t, xdsWait, func() bool { return xdsUpdates(x, xdsShardMap, "ack") == 1 }, "the map ACKed")
}

// setPeersExcept is setPeers for every unit but skip, which the map drops.
func (m *mesh) setPeersExcept(topo *routing.Topology, skip string) {
	m.t.Helper()
	sm := compile(m.t, topo)
	for _, u := range m.order {
		if u == skip {
			continue
		}
		if err := m.nodes[u].sc.SetMap(sm); err != nil {
			m.t.Fatal(err)
		}
	}
}

// RunXDS refuses a bad configuration at once, with every problem.
func TestRunXDSConfigErrors(t *testing.T) {
	ca := newTestCA(t, trustDomain)
	sc, err := New(Config{Identity: clientID, App: "127.0.0.1:1", TLS: ca.issue(meshID(clientID), time.Hour, nil),
		Outbound: "127.0.0.1:0", InboundQUIC: "127.0.0.1:0", Admin: Off})
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), xdsWait)
	defer cancel()
	for _, tc := range []struct {
		name string
		cfg  XDSConfig
		want []string
	}{
		{"no-servers", XDSConfig{}, []string{"xds: servers: at least one"}},
		{"bad-servers", XDSConfig{Servers: []string{"cp", "cp:0", "cp:7701", "cp:7701", ":7701"}}, []string{
			`servers[0] "cp": want host:port`, `servers[1] "cp:0": port "0"`, `servers[3] "cp:7701" is listed twice`, `servers[4] ":7701": want host:port`}},
		{"bad-advertise", XDSConfig{Servers: []string{"cp:7701"}, Advertise: "tcp"}, []string{`advertise "tcp"`}},
		{"backoff", XDSConfig{Servers: []string{"cp:7701"}, BackoffMin: time.Minute, BackoffMax: time.Second}, []string{"backoff min 1m0s is above max 1s"}},
		{"h2-listener-off", XDSConfig{Servers: []string{"cp:7701"}, Advertise: H2}, []string{"advertise h2 needs the inbound_tcp listener, which is off"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := slices.Clone(tc.cfg.Servers)
			err := sc.RunXDS(ctx, tc.cfg)
			if err == nil {
				t.Fatal("RunXDS accepted it")
			}
			if !slices.Equal(before, tc.cfg.Servers) {
				t.Error("RunXDS changed the caller's servers")
			}
			var ce *ConfigError
			if len(tc.want) > 1 && !errors.As(err, &ce) {
				t.Errorf("error %T, want *ConfigError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not say %q: %v", w, err)
				}
			}
		})
	}
	if sc.Status().XDS != nil {
		t.Error("a refused RunXDS left xDS state in /config")
	}
}

// The unit's lease: the sidecar asks for its own unit's, counts a grant
// from its receipt less the skew margin, ignores a resend of a grant it
// holds (it must not extend the lease), takes a newer one, refuses a bad
// one (NACK) keeping what it has, and shows it on /config and /metrics.
func TestXDSLease(t *testing.T) {
	m := newMesh(t, meshOpts{})
	cp := newTestCP(t, m.ca, cpID("cp-1"), "127.0.0.1:0")
	cp.publish(m.topo, m.endpoints())
	x := xdsNode(t, m.ca, clientID, XDSConfig{Servers: []string{cp.addr}}, nil)
	waitFor(t, xdsWait, x.sc.Ready, "the first map")
	req := cp.waitRequest("the lease request", func(r *discovery.DiscoveryRequest) bool { return r.GetTypeUrl() == xdsapi.LeaseType })
	if !slices.Equal(req.GetResourceNames(), []string{"us-east-1"}) {
		t.Fatalf("lease request names %q, want [us-east-1]", req.GetResourceNames())
	}
	if x.sc.LeaseRemaining() != 0 || x.sc.Status().Lease != nil {
		t.Fatal("a lease before any grant")
	}
	grant := func(unit string, seq, ttlMillis uint64) {
		t.Helper()
		if err := cp.leases.UpdateResource(unit, &cellmeshv1.Lease{Name: unit, Unit: unit, Seq: seq, TtlMillis: ttlMillis}); err != nil {
			t.Fatal(err)
		}
	}
	grant("eu-west-1", 7, 60000) // another unit's: never sent to this sidecar
	grant("us-east-1", 1, 60000)
	waitFor(t, xdsWait, func() bool { return x.sc.LeaseRemaining() > 0 }, "the grant")
	first := x.sc.lease.Load()
	if first.seq != 1 || first.ttl != time.Minute {
		t.Fatalf("lease %+v, want seq 1 for 60s", first)
	}
	if r := x.sc.LeaseRemaining(); r > time.Minute-leaseSkewMargin {
		t.Fatalf("remaining %s is more than the ttl less the margin", r)
	}
	// A resend of seq 1 (another version of the same grant) is ACKed and
	// ignored.
	acks := xdsUpdates(x, "lease", "ack")
	grant("us-east-1", 1, 60000)
	waitFor(t, xdsWait, func() bool { return xdsUpdates(x, "lease", "ack") > acks }, "the resend's ACK")
	if x.sc.lease.Load() != first {
		t.Fatal("a resent grant extended the lease")
	}
	// A bad grant is refused, and the lease held stays.
	grant("us-east-1", 2, 0)
	cp.waitNACK(xdsapi.LeaseType, "lease ttl 0 ms")
	if x.sc.lease.Load() != first {
		t.Fatal("a refused grant changed the lease")
	}
	grant("us-east-1", 3, 30000)
	waitFor(t, xdsWait, func() bool { return x.sc.lease.Load().seq == 3 }, "the next grant")
	st := x.sc.Status().Lease
	if st == nil || st.Seq != 3 || st.TTLSeconds != 30 || st.RemainingSeconds <= 0 || st.RemainingSeconds > 30 {
		t.Fatalf("/config lease %+v", st)
	}
	mfs, err := x.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "cellmesh_lease_remaining_seconds" {
			v := mf.GetMetric()[0].GetGauge().GetValue()
			found = v > 0 && v <= 30
		}
	}
	if !found {
		t.Fatal("cellmesh_lease_remaining_seconds is not the lease's remaining time")
	}
	// A grant delivered late (granted 20s ago) lasts only what is left of
	// it; one older than its ttl gives no lease at all.
	late := func(seq uint64, age time.Duration) {
		t.Helper()
		l := &cellmeshv1.Lease{Name: "us-east-1", Unit: "us-east-1", Seq: seq, TtlMillis: 30000, GrantedUnixMillis: uint64(time.Now().Add(-age).UnixMilli())}
		if err := cp.leases.UpdateResource("us-east-1", l); err != nil {
			t.Fatal(err)
		}
		waitFor(t, xdsWait, func() bool { return x.sc.lease.Load().seq == seq }, "the late grant")
	}
	late(4, 20*time.Second)
	if r := x.sc.LeaseRemaining(); r <= 0 || r > 10*time.Second-leaseSkewMargin {
		t.Fatalf("a grant 20s old with a 30s ttl leaves %s, want at most 10s less the margin", r)
	}
	late(5, 40*time.Second)
	if r := x.sc.LeaseRemaining(); r != 0 {
		t.Fatalf("a grant older than its ttl leaves %s, want none", r)
	}
}
