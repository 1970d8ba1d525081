// Package proxy is the sidecar: the outbound listener for the local app
// (HTTP/1.1, h2c), the inbound listeners for other sidecars (HTTP/3 over
// QUIC, HTTP/2 over TLS, both with mutual TLS), forwarding with endpoint
// picking, timeouts and retries, fencing by shard owner and epoch, the
// admin port and its metrics, the static configuration file, and the xDS
// client (one ADS stream to any control-plane replica) that feeds SetMap
// and SetEndpoints from the control plane instead of the file. Holding
// requests during a planned handoff comes with the failover issue.
//
// It decides nothing about where a request goes: that is routing's
// ShardMap. It must not import controlplane or cmd; it may import routing,
// failover and internal packages.
package proxy
