package controlplane

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

const testToken = "s3cret-token"

// testCA issues mesh identities for a test.
type testCA struct {
	dir       string
	cert, key []byte
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	cert, key, err := meshtls.NewCA("cellmesh.test", 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), cert, 0o600); err != nil {
		t.Fatal(err)
	}
	return &testCA{dir: dir, cert: cert, key: key}
}

func (c *testCA) store(t testing.TB, region, unit, service string) *meshtls.Store {
	t.Helper()
	id := meshtls.ID{TrustDomain: "cellmesh.test", Region: region, Unit: unit, Service: service}
	cert, key, err := meshtls.Issue(c.cert, c.key, id, []string{"127.0.0.1"}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	name := unit + "-" + service
	f := meshtls.Files{CA: filepath.Join(c.dir, "ca.pem"), Cert: filepath.Join(c.dir, name+".pem"), Key: filepath.Join(c.dir, name+"-key.pem")}
	if err := os.WriteFile(f.Cert, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Key, key, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := meshtls.Load(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func localTopology(t testing.TB) *routing.Topology {
	t.Helper()
	topo, err := topofile.Load("../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return topo
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// running is a replica running in the test.
type running struct {
	*Replica
	cfg  Config
	stop context.CancelFunc
	done chan error
}

// start opens and runs a replica; the test's cleanup stops it.
func start(t testing.TB, ca *testCA, cfg Config) *running {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	for _, a := range []*string{&cfg.Raft, &cfg.API, &cfg.XDS} {
		if *a == "" {
			*a = freeAddr(t)
		}
	}
	if cfg.Token == "" && !cfg.InsecureDev {
		cfg.Token = testToken
	}
	if cfg.Region == "" {
		cfg.Region = "us-east"
	}
	cfg.TLS = ca.store(t, cfg.Region, cfg.ID, meshtls.ControlPlaneService)
	cfg.Fast = true
	r, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rr := &running{Replica: r, cfg: cfg, stop: cancel, done: make(chan error, 1)}
	go func() { rr.done <- r.Run(ctx) }()
	t.Cleanup(rr.halt)
	return rr
}

func (r *running) halt() {
	r.stop()
	<-r.done
	r.done <- nil // a second halt returns at once
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// do sends an API request and returns the status and body.
func do(t testing.TB, addr, method, path, token string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	c := &http.Client{Timeout: 20 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}

func getJSON(t testing.TB, addr, path string, out any) {
	t.Helper()
	code, body := do(t, addr, "GET", path, testToken, nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, code, body)
	}
	if err := json.Unmarshal(body, out); err != nil {
		t.Fatalf("GET %s: %v in %s", path, err, body)
	}
}

// adsClient is a raw ADS stream as a sidecar would open it.
type adsClient struct {
	conn   *grpc.ClientConn
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
}

// dialADS opens an ADS stream to addr with the identity of tls and sends
// a first request for the shard map with node metadata meta (nil: none).
func dialADS(t testing.TB, addr string, tls *meshtls.Store, nodeID string, meta map[string]string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tls.ClientConfig(func(p meshtls.ID) error {
		if p.Service != meshtls.ControlPlaneService {
			return fmt.Errorf("not a control plane: %s", p)
		}
		return nil
	}, nil))))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		conn.Close()
		t.Fatal(err)
	}
	node := &core.Node{Id: nodeID}
	if meta != nil {
		fields := map[string]any{}
		for k, v := range meta {
			fields[k] = v
		}
		node.Metadata, _ = structpb.NewStruct(fields)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: xdsapi.ShardMapType, ResourceNames: []string{xdsapi.ShardMapName}}); err != nil {
		t.Fatal(err)
	}
	c := &adsClient{conn: conn, stream: stream, cancel: cancel}
	t.Cleanup(c.close)
	return c
}

func (c *adsClient) close() {
	c.cancel()
	c.conn.Close()
}
