package xdsapi

import "strings"

// Type URLs and names of the cellmesh resources on the wire, shared by the
// control plane that serves them and the sidecar that reads them.
const (
	ShardMapType = "type.googleapis.com/cellmesh.v1.ShardMap"
	LeaseType    = "type.googleapis.com/cellmesh.v1.Lease"
	// ShardMapName is the name of the one ShardMap resource.
	ShardMapName = "cellmesh"
)

// FlowWindow is the HTTP/2 flow-control window, per stream and per
// connection, that both ends of an xDS stream set statically. gRPC's
// dynamic windows answer every data frame received, when no ping is out,
// with a BDP ping and a window update: at each push, every client's
// response and every ACK cost two more writes on each side. A static
// window larger than the map needs no update during a push.
const FlowWindow = 1 << 20

// Node metadata keys a sidecar sets on its xDS node to register itself as
// an endpoint: its service, unit and region, the address peers reach it
// at and the transport ("quic" or "h2"). The control plane checks them
// against the sidecar's certificate.
const (
	MetaService   = "service"
	MetaUnit      = "unit"
	MetaRegion    = "region"
	MetaAddress   = "address"
	MetaTransport = "transport"
)

// ClusterName names the cluster of a service in a unit.
func ClusterName(service, unit string) string { return "cellmesh|" + service + "|" + unit }

// ParseClusterName splits a name made by ClusterName; ok is false for any
// other name.
func ParseClusterName(name string) (service, unit string, ok bool) {
	rest, found := strings.CutPrefix(name, "cellmesh|")
	if !found {
		return "", "", false
	}
	service, unit, found = strings.Cut(rest, "|")
	if !found || service == "" || unit == "" || strings.Contains(unit, "|") {
		return "", "", false
	}
	return service, unit, true
}
