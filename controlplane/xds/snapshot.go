// Package xds builds what the control plane serves over xDS: for every
// service in every unit an Envoy Cluster (EDS) and ClusterLoadAssignment
// whose locality is region / zone = unit, and the cellmesh.v1.ShardMap
// resource. The Envoy resources form a go-control-plane snapshot, checked
// with Snapshot.Consistent (and cellmesh's own checks) before it is
// returned; go-control-plane's snapshots take only Envoy's types, so the
// shard map is returned beside it, for a LinearCache of its type.
//
// It must not hold state: the store holds it, and the server publishes what
// this package builds.
package xds

import (
	"fmt"
	"net/netip"
	"sort"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// Type URLs and names of the cellmesh resources (internal/xdsapi holds
// them, shared with the sidecar).
const (
	ShardMapType = xdsapi.ShardMapType
	LeaseType    = xdsapi.LeaseType
	ShardMapName = xdsapi.ShardMapName
)

// Endpoint is a registered instance of a service: its sidecar's inbound
// listener, and how peers reach it ("quic" or "h2").
type Endpoint struct {
	Service, Unit, Address, Transport string
	// Down: gossip finds the sidecar dead. It is served with health
	// status UNHEALTHY, which xDS clients (Envoy's too) leave out of load
	// balancing; its cluster stays, so a client drops it at once rather
	// than holding a vanished cluster's endpoints.
	Down bool
	// Draining: the sidecar left (a clean stop). It is served with health
	// status DRAINING: out of load balancing too, but a client keeps its
	// connections, so requests in flight to it finish.
	Draining bool
}

// ClusterName names the cluster of a service in a unit.
func ClusterName(service, unit string) string { return xdsapi.ClusterName(service, unit) }

// Resources are what one version serves.
type Resources struct {
	// Endpoints holds the clusters and their load assignments.
	Endpoints *cache.Snapshot
	// ShardMap is the cellmesh.v1.ShardMap resource, named ShardMapName.
	ShardMap *cellmeshv1.ShardMap
	// Leases are the units' cellmesh.v1.Lease resources, each named by its
	// unit (Build leaves them to the caller).
	Leases []*cellmeshv1.Lease
}

// Build builds the resources of one version: the clusters and their
// assignments from eps, the shard map from m. It refuses endpoints of
// units the map does not declare or with bad addresses, and returns the
// snapshot only when it is consistent.
func Build(version string, m *routing.ShardMap, eps []Endpoint) (*Resources, error) {
	if m == nil {
		return nil, fmt.Errorf("snapshot %s: no shard map", version)
	}
	type key struct{ service, unit string }
	groups := map[key][]Endpoint{}
	for i, e := range eps {
		if _, ok := m.Unit(e.Unit); !ok {
			return nil, fmt.Errorf("snapshot %s: endpoint %d (%s at %s) is in unit %q, which topology version %d lacks", version, i, e.Service, e.Address, e.Unit, m.Version())
		}
		if e.Service == "" {
			return nil, fmt.Errorf("snapshot %s: endpoint %d at %s has no service", version, i, e.Address)
		}
		if _, err := netip.ParseAddrPort(e.Address); err != nil {
			return nil, fmt.Errorf("snapshot %s: endpoint %d (%s in %s): address %q: want ip:port", version, i, e.Service, e.Unit, e.Address)
		}
		if e.Transport != "quic" && e.Transport != "h2" {
			return nil, fmt.Errorf("snapshot %s: endpoint %d (%s in %s): transport %q: want quic or h2", version, i, e.Service, e.Unit, e.Transport)
		}
		k := key{e.Service, e.Unit}
		groups[k] = append(groups[k], e)
	}
	keys := make([]key, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].service != keys[j].service {
			return keys[i].service < keys[j].service
		}
		return keys[i].unit < keys[j].unit
	})
	var clusters, clas []types.Resource
	for _, k := range keys {
		u, _ := m.Unit(k.unit)
		name := ClusterName(k.service, k.unit)
		clusters = append(clusters, &cluster.Cluster{
			Name:                 name,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
			EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{EdsConfig: &core.ConfigSource{
				ResourceApiVersion:    resource.DefaultAPIVersion,
				ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
			}},
			ConnectTimeout: durationpb.New(2 * time.Second),
			LbPolicy:       cluster.Cluster_LEAST_REQUEST,
		})
		var lbs []*endpoint.LbEndpoint
		for _, e := range groups[k] {
			ap := netip.MustParseAddrPort(e.Address)
			proto := core.SocketAddress_UDP
			if e.Transport == "h2" {
				proto = core.SocketAddress_TCP
			}
			health := core.HealthStatus_HEALTHY
			switch {
			case e.Down:
				health = core.HealthStatus_UNHEALTHY
			case e.Draining:
				health = core.HealthStatus_DRAINING
			}
			lbs = append(lbs, &endpoint.LbEndpoint{
				HealthStatus: health,
				HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: &core.Address{
					Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
						Protocol: proto, Address: ap.Addr().String(),
						PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
					}},
				}}},
				Metadata: &core.Metadata{FilterMetadata: map[string]*structpb.Struct{
					"cellmesh": {Fields: map[string]*structpb.Value{"transport": structpb.NewStringValue(e.Transport)}},
				}},
			})
		}
		sort.Slice(lbs, func(i, j int) bool {
			return lbs[i].GetEndpoint().GetAddress().GetSocketAddress().String() < lbs[j].GetEndpoint().GetAddress().GetSocketAddress().String()
		})
		clas = append(clas, &endpoint.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				Locality:    &core.Locality{Region: u.Region, Zone: u.Name},
				LbEndpoints: lbs,
			}},
		})
	}
	sm := xdsapi.FromTopology(m.Topology())
	sm.Name = ShardMapName
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ClusterType:  clusters,
		resource.EndpointType: clas,
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", version, err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("snapshot %s is not consistent: %w", version, err)
	}
	return &Resources{Endpoints: snap, ShardMap: sm}, nil
}
