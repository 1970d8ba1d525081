// Package xdsapi converts between the pure routing model and the cellmesh.v1
// resources that travel over xDS (cellmeshv1, generated from
// cellmeshv1/cellmesh.proto). The control plane builds resources with
// FromTopology; the sidecar's xDS client reads them with ToTopology and
// then routing.Compile, which validates what arrived.
//
// It must not decide anything about routing, do I/O or import proxy,
// controlplane or failover.
package xdsapi
