package proxy

import (
	"io"
	"net/http"
	"testing"
)

// BenchmarkOutbound measures one request through the outbound listener,
// over a keep-alive HTTP/1.1 connection, against the echo's small answer:
// local is the app's own unit (one hop to the app), quic and h2 cross to
// another unit's sidecar. Compare with direct, the echo without a sidecar.
func BenchmarkOutbound(b *testing.B) {
	m := newMesh(b, meshOpts{h2Units: []string{"eu-west-2"}})
	for _, bc := range []struct{ name, uid, url string }{
		{"direct", "2088000000012", "http://" + m.nodes["us-east-1"].app.Listener.Addr().String() + "/"},
		{"local", "2088000000012", "http://" + m.nodes["us-east-1"].addrs.Outbound + "/"},
		{"quic", "2088000000057", "http://" + m.nodes["us-east-1"].addrs.Outbound + "/"},
		{"h2", "2088000000089", "http://" + m.nodes["us-east-1"].addrs.Outbound + "/"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			req, _ := http.NewRequest("GET", bc.url, nil)
			req.Host = "echo"
			req.Header.Set("x-cellmesh-uid", bc.uid)
			req.Header.Set("x-echo-small", "1")
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.Do(req)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
		})
	}
}
