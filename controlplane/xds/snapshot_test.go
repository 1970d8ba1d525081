package xds

import (
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

func localMap(t *testing.T) *routing.ShardMap {
	t.Helper()
	topo, err := topofile.Load("../../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m, err := routing.Compile(topo)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestSnapshot(t *testing.T) {
	m := localMap(t)
	eps := []Endpoint{
		{"echo", "us-east-1", "127.0.0.1:15201", "quic", false, false},
		{"echo", "us-east-1", "127.0.0.1:15211", "quic", false, false},
		{"echo", "eu-west-2", "127.0.0.1:15304", "h2", false, true},     // left: served DRAINING
		{"ledger", "eu-west-1", "127.0.0.1:16203", "quic", true, false}, // down: served UNHEALTHY
	}
	res, err := Build("7", m, eps)
	if err != nil {
		t.Fatal(err)
	}
	snap := res.Endpoints
	if got := len(snap.GetResources(resource.ClusterType)); got != 3 {
		t.Errorf("%d clusters, want 3 (one per service and unit)", got)
	}
	clas := snap.GetResources(resource.EndpointType)
	cla, ok := clas[ClusterName("echo", "us-east-1")].(*endpoint.ClusterLoadAssignment)
	if !ok {
		t.Fatalf("no assignment for echo in us-east-1: %v", clas)
	}
	loc := cla.Endpoints[0].Locality
	if loc.Region != "us-east" || loc.Zone != "us-east-1" || len(cla.Endpoints[0].LbEndpoints) != 2 {
		t.Errorf("locality %v with %d endpoints, want us-east / us-east-1 with 2", loc, len(cla.Endpoints[0].LbEndpoints))
	}
	for name, want := range map[string]core.HealthStatus{ClusterName("echo", "us-east-1"): core.HealthStatus_HEALTHY, ClusterName("ledger", "eu-west-1"): core.HealthStatus_UNHEALTHY,
		ClusterName("echo", "eu-west-2"): core.HealthStatus_DRAINING} {
		c := clas[name].(*endpoint.ClusterLoadAssignment)
		if got := c.Endpoints[0].LbEndpoints[0].GetHealthStatus(); got != want {
			t.Errorf("%s: health %v, want %v", name, got, want)
		}
	}
	sm := res.ShardMap
	if sm.GetName() != ShardMapName {
		t.Fatalf("shard map resource named %q, want %q", sm.GetName(), ShardMapName)
	}
	got, err := xdsapi.ToTopology(sm)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(m.Topology(), got, cmpopts.EquateEmpty()); d != "" {
		t.Errorf("the shard map resource is not the topology (-want +got):\n%s", d)
	}
	if snap.GetVersion(resource.EndpointType) != "7" {
		t.Errorf("version %q, want 7", snap.GetVersion(resource.EndpointType))
	}
}

func TestSnapshotRefusesBadEndpoints(t *testing.T) {
	m := localMap(t)
	for _, tc := range []struct {
		ep   Endpoint
		want string
	}{
		{Endpoint{"echo", "us-west-9", "127.0.0.1:1", "quic", false, false}, `unit "us-west-9"`},
		{Endpoint{"echo", "us-east-1", "localhost:1", "quic", false, false}, "want ip:port"},
		{Endpoint{"echo", "us-east-1", "127.0.0.1:1", "tcp", false, false}, "want quic or h2"},
		{Endpoint{"", "us-east-1", "127.0.0.1:1", "quic", false, false}, "no service"},
	} {
		if _, err := Build("1", m, []Endpoint{tc.ep}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error containing %q", tc.ep, err, tc.want)
		}
	}
	if _, err := Build("1", nil, nil); err == nil {
		t.Error("a snapshot without a map was built")
	}
}
