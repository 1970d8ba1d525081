// Package proxy is the sidecar: the outbound listener for the local app, the
// inbound QUIC/HTTP/3 listener for other sidecars, forwarding, the xDS client,
// epoch fencing and request holding during a handoff.
//
// It decides nothing about where a request goes: that is routing's ShardMap.
// It must not import controlplane or cmd; it may import routing and failover.
package proxy
