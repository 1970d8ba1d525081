package proxy

import (
	"bufio"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Garbage on every port of a sidecar crashes nothing, and the mesh still
// routes afterwards.
func TestGarbageOnEveryPort(t *testing.T) {
	m := newMesh(t, meshOpts{})
	n := m.nodes["eu-west-1"]
	rng := rand.New(rand.NewPCG(5, 6))
	random := func(size int) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}

	t.Run("quic", func(t *testing.T) {
		conn, err := net.Dial("udp", n.addrs.InboundQUIC)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		packets := [][]byte{
			// A long-header Initial of QUIC v1 cut short after the version.
			{0xc0, 0x00, 0x00, 0x00, 0x01},
			// The same with connection ID lengths that run past the end.
			{0xc3, 0x00, 0x00, 0x00, 0x01, 0x14, 0x01, 0x02},
			// A padded Initial-sized datagram of garbage after the header.
			append([]byte{0xc0, 0x00, 0x00, 0x00, 0x01, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0x00}, random(1200)...),
			// An unknown version, asking for version negotiation.
			append([]byte{0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0x00}, random(1200)...),
			{}, {0x00}, {0x40},
		}
		for range 200 {
			packets = append(packets, random(1+rng.IntN(1400)))
		}
		for _, p := range packets {
			if _, err := conn.Write(p); err != nil {
				t.Fatal(err)
			}
		}
	})

	// tcpGarbage sends payload to addr and reads what comes back until the
	// server closes or 5s pass.
	tcpGarbage := func(t *testing.T, addr string, payload []byte) []byte {
		t.Helper()
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		go func() { conn.Write(payload) }() // the server may close before it has read all
		got, _ := io.ReadAll(io.LimitReader(conn, 64<<10))
		return got
	}
	requestLine := func() []byte {
		return append([]byte("GET /"+strings.Repeat("A", 100<<10)+" HTTP/1.1\r\nHost: echo\r\n"), random(100<<10)...)
	}
	ports := map[string]string{"outbound": n.addrs.Outbound, "admin": n.addrs.Admin, "inbound_tcp": n.addrs.InboundTCP}
	for name, addr := range ports {
		t.Run(name, func(t *testing.T) {
			tcpGarbage(t, addr, random(64<<10))
			tcpGarbage(t, addr, append([]byte("GET / HTTP/1.1\r\nHost: echo\r\n"), random(100<<10)...))
			got := tcpGarbage(t, addr, requestLine())
			if name != "inbound_tcp" {
				// An HTTP listener answers a 4xx before it closes.
				if resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(string(got))), nil); err != nil {
					t.Errorf("no HTTP answer to a 100 KiB request line: %v (%q)", err, got)
				} else if resp.StatusCode < 400 || resp.StatusCode >= 500 {
					t.Errorf("a 100 KiB request line got status %d, want a 4xx", resp.StatusCode)
				}
			}
			// A TLS record header announcing a record it never sends, then
			// a close.
			conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write([]byte{0x16, 0x03, 0x01, 0xff, 0xff, 0x01})
			conn.Close()
		})
	}

	// Every sidecar is still up and routes.
	for _, u := range m.order {
		select {
		case err := <-m.nodes[u].done:
			t.Fatalf("sidecar %s stopped: %v", u, err)
		default:
		}
		if !m.nodes[u].sc.Ready() {
			t.Errorf("sidecar %s is not ready", u)
		}
	}
	c := newClient()
	for _, from := range m.order {
		resp, body := m.get(c, from, uidEUWest1, "/")
		if resp.StatusCode != http.StatusOK || decodeEcho(t, body).Unit != "eu-west-1" {
			t.Fatalf("from %s after the garbage: status %d: %s", from, resp.StatusCode, body)
		}
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		req, _ := http.NewRequest("GET", "http://"+n.addrs.Admin+p, nil)
		if resp, body := do(t, c, req); resp.StatusCode != http.StatusOK {
			t.Errorf("%s after the garbage: status %d: %s", p, resp.StatusCode, body)
		}
	}
}
