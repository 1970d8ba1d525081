// Package echo is a tiny HTTP service that answers with what it received. It
// stands behind cellmesh sidecars in the examples, the tests and the
// benchmarks, where it shows which unit and region a request reached and
// whether its headers, body and trailers arrived whole.
//
// It owns the echo routes (see Handler) and their two metrics. It must stay
// cheap enough to serve as the benchmark baseline: no logging per request, no
// body buffered whole, no goroutine per request beyond the server's own. It
// knows nothing of routing, shards or epochs and imports no other cellmesh
// package; the x-cellmesh-* headers a sidecar adds are reported like any
// other header.
package echo
