// Package cellmeshv1 holds the generated Go code of cellmesh.proto: the
// cellmesh.v1 resources (ShardMap, Lease) that the control plane serves
// over xDS beside Envoy's clusters and endpoints.
package cellmeshv1

//go:generate ./gen.sh
