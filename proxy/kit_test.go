package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/examples/echo"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	"github.com/prometheus/client_golang/prometheus"
)

const trustDomain = "cellmesh.test"

// testCA is a mesh CA written to a directory, issuing sidecar certificates.
type testCA struct {
	t          testing.TB
	dir        string
	cert, key  []byte
	bundlePath string
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	dir := t.TempDir()
	cert, key, err := meshtls.NewCA(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ca := &testCA{t: t, dir: dir, cert: cert, key: key, bundlePath: filepath.Join(dir, "ca.pem")}
	if err := os.WriteFile(ca.bundlePath, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	return ca
}

// issue writes a certificate for id and returns a loaded store. bundle is
// the CA file the store trusts (nil: this CA).
func (ca *testCA) issue(id meshtls.ID, validity time.Duration, bundle *testCA) *meshtls.Store {
	ca.t.Helper()
	cert, key, err := meshtls.Issue(ca.cert, ca.key, id, []string{"127.0.0.1"}, validity, time.Now())
	if err != nil {
		ca.t.Fatal(err)
	}
	name := fmt.Sprintf("%s-%s-%d", id.Unit, id.Service, time.Now().UnixNano())
	cp, kp := filepath.Join(ca.dir, name+".pem"), filepath.Join(ca.dir, name+"-key.pem")
	if err := os.WriteFile(cp, cert, 0o600); err != nil {
		ca.t.Fatal(err)
	}
	if err := os.WriteFile(kp, key, 0o600); err != nil {
		ca.t.Fatal(err)
	}
	if bundle == nil {
		bundle = ca
	}
	st, err := meshtls.Load(meshtls.Files{CA: bundle.bundlePath, Cert: cp, Key: kp}, nil)
	if err != nil {
		ca.t.Fatal(err)
	}
	return st
}

// localTopology is the local example's topology.
func localTopology(t testing.TB) *routing.Topology {
	t.Helper()
	topo, err := topofile.Load("../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return topo
}

func compile(t testing.TB, topo *routing.Topology) *routing.ShardMap {
	t.Helper()
	m, err := routing.Compile(topo)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// node is one unit of a test mesh: an echo app and its sidecar.
type node struct {
	id    Identity
	app   *httptest.Server
	sc    *Sidecar
	reg   *prometheus.Registry
	logs  *syncBuffer
	addrs Addrs
	stop  context.CancelFunc
	done  chan error
}

// mesh is several units on 127.0.0.1, each with an echo app behind a
// sidecar, all talking real QUIC (or HTTP/2 on TLS) with mutual TLS.
type mesh struct {
	t     testing.TB
	ca    *testCA
	topo  *routing.Topology
	nodes map[string]*node
	order []string
}

type meshOpts struct {
	h2Units   []string                      // units reached over HTTP/2 on TLS instead of QUIC
	configure func(*Config)                 // changes every sidecar's config before New
	store     func(Identity) *meshtls.Store // overrides the certificate of a unit
	app       func(Identity) http.Handler   // overrides the echo of a unit (nil: echo)
}

func newMesh(t testing.TB, o meshOpts) *mesh {
	t.Helper()
	m := &mesh{t: t, ca: newTestCA(t, trustDomain), topo: localTopology(t), nodes: map[string]*node{}}
	sm := compile(t, m.topo)
	for _, u := range m.topo.Units {
		id := Identity{Region: u.Region, Unit: u.Name, Service: "echo"}
		n := &node{id: id, reg: prometheus.NewRegistry(), logs: &syncBuffer{}}
		var h http.Handler
		if o.app != nil {
			h = o.app(id)
		}
		if h == nil {
			h = echo.Handler(echo.Info{Service: id.Service, Unit: id.Unit, Region: id.Region}, nil)
		}
		n.app = httptest.NewServer(h)
		t.Cleanup(n.app.Close)
		var store *meshtls.Store
		if o.store != nil {
			store = o.store(id)
		}
		if store == nil {
			store = m.ca.issue(meshtls.ID{TrustDomain: trustDomain, Region: id.Region, Unit: id.Unit, Service: id.Service}, time.Hour, nil)
		}
		cfg := Config{
			Identity: id, App: n.app.Listener.Addr().String(), TLS: store,
			Outbound: "127.0.0.1:0", InboundQUIC: "127.0.0.1:0", InboundTCP: "127.0.0.1:0", Admin: "127.0.0.1:0",
			Logger:   slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Registry: n.reg, DrainTimeout: 10 * time.Second, // > the 5s net/http gives a fresh, unused connection
		}
		if o.configure != nil {
			o.configure(&cfg)
		}
		sc, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := sc.Listen(); err != nil {
			t.Fatal(err)
		}
		if err := sc.SetMap(sm); err != nil {
			t.Fatal(err)
		}
		n.sc, n.addrs = sc, sc.Addrs()
		m.nodes[id.Unit] = n
		m.order = append(m.order, id.Unit)
	}
	eps := m.endpoints(o.h2Units...)
	for _, u := range m.order {
		n := m.nodes[u]
		if err := n.sc.SetEndpoints(eps, 1); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		n.stop, n.done = cancel, make(chan error, 1)
		go func() { n.done <- n.sc.Run(ctx) }()
		t.Cleanup(func() { n.shutdown(t) })
	}
	for _, u := range m.order {
		waitFor(t, 5*time.Second, func() bool { return m.nodes[u].sc.Ready() }, "sidecar "+u+" ready")
	}
	return m
}

// endpoints lists every unit's inbound listener; h2Units are reached over
// HTTP/2 on TLS.
func (m *mesh) endpoints(h2Units ...string) []Endpoint {
	var eps []Endpoint
	for _, u := range m.order {
		n := m.nodes[u]
		ep := Endpoint{Service: "echo", Unit: u, Address: n.addrs.InboundQUIC, Transport: QUIC}
		for _, h := range h2Units {
			if h == u {
				ep.Address, ep.Transport = n.addrs.InboundTCP, H2
			}
		}
		eps = append(eps, ep)
	}
	return eps
}

// shutdown stops the node's sidecar and waits for Run to return.
func (n *node) shutdown(t testing.TB) {
	if n.stop == nil {
		return
	}
	n.stop()
	n.stop = nil
	select {
	case err := <-n.done:
		if err != nil {
			t.Errorf("sidecar %s: Run: %v", n.id.Unit, err)
		}
	case <-time.After(20 * time.Second):
		t.Errorf("sidecar %s did not stop within 20s", n.id.Unit)
	}
}

// client is an HTTP/1.1 client for an outbound listener.
func newClient() *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
}

// get sends a request for uid through the unit's outbound listener.
func (m *mesh) get(c *http.Client, from, uid, path string) (*http.Response, []byte) {
	m.t.Helper()
	req, err := http.NewRequest("GET", "http://"+m.nodes[from].addrs.Outbound+path, nil)
	if err != nil {
		m.t.Fatal(err)
	}
	req.Host = "echo"
	if uid != "" {
		req.Header.Set("x-cellmesh-uid", uid)
	}
	return do(m.t, c, req)
}

func do(t testing.TB, c *http.Client, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return resp, body
}

func decodeEcho(t testing.TB, body []byte) echo.Response {
	t.Helper()
	var r echo.Response
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("echo answer is not JSON: %v: %q", err, body)
	}
	return r
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func (b *syncBuffer) contains(s string) bool { return strings.Contains(b.String(), s) }

// freeAddr is a 127.0.0.1 port nobody listens on (TCP).
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}
