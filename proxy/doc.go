// Package proxy is the sidecar: the outbound listener for the local app
// (HTTP/1.1, h2c), the inbound listeners for other sidecars (HTTP/3 over
// QUIC, HTTP/2 over TLS, both with mutual TLS), forwarding with endpoint
// picking, timeouts and retries, fencing by shard owner and epoch, the
// admin port and its metrics, and the static configuration file. Holding
// requests during a handoff and the xDS client come with later issues; the
// xDS client will call SetMap and SetEndpoints as the static file does.
//
// It decides nothing about where a request goes: that is routing's
// ShardMap. It must not import controlplane or cmd; it may import routing,
// failover and internal packages.
package proxy
