package xds

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// A real ADS stream over gRPC gets the shard map and the clusters, ACKs
// them, and gets the next version when it is published; an older version
// is refused.
func TestADSStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := NewServer(nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	defer s.Stop()

	m := localMap(t)
	eps := []Endpoint{{"echo", "us-east-1", "127.0.0.1:15201", "quic", false, false}, {"echo", "eu-west-1", "127.0.0.1:15203", "quic", false, false}}
	res, err := Build("1", m, eps)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(ctx, 1, res); err != nil {
		t.Fatal(err)
	}

	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "sidecar-us-east-1"}
	recv := func(typeURL string) *discovery.DiscoveryResponse {
		t.Helper()
		for {
			r, err := stream.Recv()
			if err != nil {
				t.Fatalf("waiting for %s: %v", typeURL, err)
			}
			if r.TypeUrl == typeURL {
				return r
			}
		}
	}
	shardMap := func(r *discovery.DiscoveryResponse) *routing.Topology {
		t.Helper()
		if len(r.Resources) != 1 {
			t.Fatalf("%d shard map resources, want 1", len(r.Resources))
		}
		var sm cellmeshv1.ShardMap
		if err := r.Resources[0].UnmarshalTo(&sm); err != nil {
			t.Fatal(err)
		}
		topo, err := xdsapi.ToTopology(&sm)
		if err != nil {
			t.Fatal(err)
		}
		return topo
	}

	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: ShardMapType}); err != nil {
		t.Fatal(err)
	}
	r := recv(ShardMapType)
	if got := shardMap(r); got.Version != 1 {
		t.Fatalf("topology version %d, want 1", got.Version)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: ShardMapType, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if c := recv(resource.ClusterType); len(c.Resources) != 2 || c.VersionInfo != "1" {
		t.Fatalf("%d clusters at version %q, want 2 at 1", len(c.Resources), c.VersionInfo)
	}

	// Shard 7 moves: the next version reaches the open stream.
	next := m.Topology()
	next.Version = 2
	for i := range next.Assignments {
		if a := &next.Assignments[i]; a.Shard == 7 {
			a.Primary, a.Standbys, a.Epoch = "eu-west-1", []string{"us-east-1"}, 2
		}
	}
	m2, err := routing.Compile(next)
	if err != nil {
		t.Fatal(err)
	}
	res2, err := Build("2", m2, eps)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(ctx, 2, res2); err != nil {
		t.Fatal(err)
	}
	got := shardMap(recv(ShardMapType))
	if got.Version != 2 {
		t.Fatalf("pushed topology version %d, want 2", got.Version)
	}
	for _, a := range got.Assignments {
		if a.Shard == 7 && (a.Primary != "eu-west-1" || a.Epoch != 2) {
			t.Fatalf("pushed shard 7 on %s at epoch %d, want eu-west-1 at 2", a.Primary, a.Epoch)
		}
	}
	if err := s.Publish(ctx, 2, res2); err == nil {
		t.Fatal("the same version was published twice")
	}
	if err := s.Publish(ctx, 1, res); err == nil {
		t.Fatal("an older version was published")
	}
}

// A shard move resends only the map: the clusters and load assignments,
// unchanged, keep their version and are not sent again; an endpoint
// change resends them (at the new version) and not the map. A map of
// 10,000 shards arrives whole (the shared encoding of large resources).
func TestPublishSendsWhatChanged(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := NewServer(nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	defer s.Stop()

	topo := localMap(t).Topology()
	topo.Shards = 10000
	topo.Assignments = topo.Assignments[:0]
	units := []string{"us-east-1", "us-east-2", "eu-west-1", "eu-west-2"}
	standby := map[string]string{"us-east-1": "eu-west-1", "us-east-2": "eu-west-2", "eu-west-1": "us-east-1", "eu-west-2": "us-east-2"}
	for i := range topo.Shards {
		u := units[i*len(units)/topo.Shards]
		topo.Assignments = append(topo.Assignments, routing.Assignment{Shard: i, Primary: u, Standbys: []string{standby[u]}, Epoch: 1, State: routing.StateServing})
	}
	m, err := routing.Compile(topo)
	if err != nil {
		t.Fatal(err)
	}
	eps := []Endpoint{{"echo", "us-east-1", "127.0.0.1:15201", "quic", false, false}}
	publish := func(version uint64, m *routing.ShardMap, eps []Endpoint) {
		t.Helper()
		res, err := Build(strconv.FormatUint(version, 10), m, eps)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Publish(ctx, version, res); err != nil {
			t.Fatal(err)
		}
	}
	publish(1, m, eps)

	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// next receives the next response and ACKs it.
	next := func() *discovery.DiscoveryResponse {
		t.Helper()
		r, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		ack := &discovery.DiscoveryRequest{TypeUrl: r.TypeUrl, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}
		switch r.TypeUrl {
		case ShardMapType:
			ack.ResourceNames = []string{ShardMapName}
		case resource.EndpointType:
			ack.ResourceNames = []string{ClusterName("echo", "us-east-1"), ClusterName("echo", "eu-west-1")}
		}
		if err := stream.Send(ack); err != nil {
			t.Fatal(err)
		}
		return r
	}
	mapOf := func(r *discovery.DiscoveryResponse) *routing.Topology {
		t.Helper()
		var sm cellmeshv1.ShardMap
		if err := r.Resources[0].UnmarshalTo(&sm); err != nil {
			t.Fatal(err)
		}
		got, err := xdsapi.ToTopology(&sm)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	node := &core.Node{Id: "sidecar-us-east-1"}
	for _, req := range []*discovery.DiscoveryRequest{
		{Node: node, TypeUrl: resource.ClusterType},
		{TypeUrl: resource.EndpointType, ResourceNames: []string{ClusterName("echo", "us-east-1")}},
		{TypeUrl: ShardMapType, ResourceNames: []string{ShardMapName}},
	} {
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		r := next()
		if r.TypeUrl == ShardMapType {
			if got := mapOf(r); got.Version != 1 || len(got.Assignments) != 10000 || got.Assignments[9999].Primary != "eu-west-2" {
				t.Fatalf("first map: version %d, %d assignments", got.Version, len(got.Assignments))
			}
		} else if r.VersionInfo != "1" {
			t.Fatalf("first %s at version %q, want 1", r.TypeUrl, r.VersionInfo)
		}
	}

	// Shard 7 moves: the map only (were the clusters resent, they would
	// come first).
	moved := m.Topology()
	moved.Version = 2
	moved.Assignments[7].Primary, moved.Assignments[7].Standbys, moved.Assignments[7].Epoch = "eu-west-1", []string{"us-east-1"}, 2
	m2, err := routing.Compile(moved)
	if err != nil {
		t.Fatal(err)
	}
	publish(2, m2, eps)
	r := next()
	if r.TypeUrl != ShardMapType {
		t.Fatalf("after a shard move: %s at version %q, want the shard map", r.TypeUrl, r.VersionInfo)
	}
	if got := mapOf(r); got.Version != 2 || got.Assignments[7].Primary != "eu-west-1" || got.Assignments[7].Epoch != 2 || len(got.Assignments) != 10000 {
		t.Fatalf("after a shard move: map version %d, shard 7 on %s at epoch %d", got.Version, got.Assignments[7].Primary, got.Assignments[7].Epoch)
	}

	// A second endpoint in the same cluster: the load assignment only, at
	// version 3; then a new cluster: the clusters at version 4.
	publish(3, m2, append(eps, Endpoint{"echo", "us-east-1", "127.0.0.1:15211", "quic", false, false}))
	if r := next(); r.TypeUrl != resource.EndpointType || r.VersionInfo != "3" {
		t.Fatalf("after an endpoint change: %s at version %q, want endpoints at 3", r.TypeUrl, r.VersionInfo)
	}
	publish(4, m2, append(eps, Endpoint{"echo", "us-east-1", "127.0.0.1:15211", "quic", false, false}, Endpoint{"echo", "eu-west-1", "127.0.0.1:15301", "quic", false, false}))
	if r := next(); r.TypeUrl != resource.ClusterType || r.VersionInfo != "4" || len(r.Resources) != 2 {
		t.Fatalf("after a new cluster: %s at version %q with %d resources, want 2 clusters at 4", r.TypeUrl, r.VersionInfo, len(r.Resources))
	}
	if s.Version() != 4 {
		t.Fatalf("published version %d, want 4", s.Version())
	}
}
