// Command xdsload measures how fast a control-plane replica pushes a
// one-shard change to many ADS clients (bench/controlplane.sh).
//
//	xdsload --xds 127.0.0.1:7701 --api http://127.0.0.1:7700 --token-file T \
//	        --tls-ca ca.pem --tls-cert c.pem --tls-key c-key.pem \
//	        --clients 1000 --rounds 30 --shard 0 --units us-east-1,eu-west-1
//
// It opens --clients ADS streams, each on a gRPC connection of its own
// with mutual TLS, as a sidecar does (one client certificate for all; the
// server must present a certificate of service cellmesh-controlplane).
// Each stream subscribes to the shard map (state of the world) and, with
// --clusters (the default, as a sidecar), to the clusters; it ACKs every
// response with its version and nonce, and records when it received each
// version of the map. A client reads every byte of a response but decodes
// only the map's version (lightCodec), so that the machine's CPU goes to
// the control plane. The clients never register as endpoints.
//
// First it moves --shard --idle-moves times with no client connected (what
// a move costs the replica by itself: raft, the API, building the
// resources), then connects the clients. When every client holds the map
// it moves the shard --rounds times, alternating between the two --units,
// --interval apart. For each round it takes the time the move was sent,
// the time its answer came (accepted: committed through raft and
// published), the time the last client received the map of the new
// version and sent its ACK, and then polls the replica's /metrics until
// the server has counted every client's ACK of that version.
//
// It prints one line of key=value pairs (times in milliseconds):
//
//	clients= rounds= map_bytes= connect_s=      the map's size, the time to connect every client
//	last_{p50,p99,max}_ms=                      from the move's answer to the last client's receipt
//	sent_last_{p50,p99,max}_ms=                 from the move being sent to the same
//	ack_{p50,p99,max}_ms=                       from the answer to the last ACK sent
//	srvack_{p50,p99,max}_ms=                    from the answer to the server counting the last ACK (±2 ms)
//	api_p50_ms= api_max_ms=                     the move request itself
//	client_p50_ms=                              from the answer to the median client's receipt, median round
//	cp_cpu_s= cp_cpu_ms_per_move=               the replica's CPU over the rounds, and per move
//	cp_idle_cpu_ms_per_move=                    per move with no client
//	cp_scrape_cpu_ms=                           per /metrics scrape (taken out of the figures above)
//	cp_cpu_us_per_push_client=                  (per move - per move with no client) / clients
//	cp_rss_before_mib= cp_rss_mib= cp_rss_after_mib=   no client, every client connected, after the rounds
//	cp_heap_before_mib= cp_heap_mib=            the same for the Go heap in use
//	cp_rss_kib_per_client= cp_heap_kib_per_client= cp_goroutines_per_client=
//	load_cpu_s=                                 this process's CPU over the rounds
//
// Percentiles are over the rounds (nearest rank): with fewer than 100
// rounds the p99 is the slowest round. --rounds-out writes every round as
// CSV; --cpu-profile-url and --heap-profile-url fetch pprof profiles from
// a bench build of the replica (bench/xdsload/replica).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
)

type options struct {
	xds, api, token   string
	files             meshtls.Files
	clients, rounds   int
	interval, timeout time.Duration
	settle            time.Duration
	shard             int
	units             [2]string
	clusters          bool
	dialers           int
	roundsOut         string
	cpuProf, cpuURL   string
	heapProf, heapURL string
	maxRecv           int
	idleMoves         int
}

func main() {
	o, err := parse(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "xdsload:", err)
		os.Exit(2)
	}
	res, err := run(context.Background(), o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "xdsload:", err)
		os.Exit(1)
	}
	fmt.Println(res)
}

func parse(args []string) (options, error) {
	var o options
	var units, tokenFile string
	fs := flag.NewFlagSet("xdsload", flag.ContinueOnError)
	fs.StringVar(&o.xds, "xds", "", "xDS address of the replica (`ip:port`)")
	fs.StringVar(&o.api, "api", "", "operator API of the replica (`http://ip:port`); its /metrics too")
	fs.StringVar(&tokenFile, "token-file", "", "file holding the API bearer token (none: an --insecure-dev replica)")
	fs.StringVar(&o.files.CA, "tls-ca", "", "CA bundle of the mesh")
	fs.StringVar(&o.files.Cert, "tls-cert", "", "the clients' certificate (any mesh workload)")
	fs.StringVar(&o.files.Key, "tls-key", "", "its key")
	fs.IntVar(&o.clients, "clients", 100, "ADS clients, one gRPC connection each")
	fs.IntVar(&o.rounds, "rounds", 30, "moves measured")
	fs.IntVar(&o.idleMoves, "idle-moves", 10, "moves made before the clients connect, to measure a move's own CPU")
	fs.DurationVar(&o.interval, "interval", 300*time.Millisecond, "pause between a round's end and the next move")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "longest wait for every client to hold a version")
	fs.DurationVar(&o.settle, "settle", 3*time.Second, "wait after the clients connected, before the memory is read")
	fs.IntVar(&o.shard, "shard", 0, "the shard moved")
	fs.StringVar(&units, "units", "", "`a,b`: the two units the shard alternates between (required)")
	fs.BoolVar(&o.clusters, "clusters", true, "subscribe to the clusters too, as a sidecar does")
	fs.IntVar(&o.dialers, "dialers", 32, "connections set up at once")
	fs.StringVar(&o.roundsOut, "rounds-out", "", "write every round to this CSV `file`")
	fs.StringVar(&o.cpuURL, "cpu-profile-url", "", "a pprof `URL` of the replica (/debug/pprof/profile, bench builds only) to profile during the rounds")
	fs.StringVar(&o.cpuProf, "cpu-profile", "", "where to write that profile")
	fs.StringVar(&o.heapURL, "heap-profile-url", "", "a pprof heap `URL` of the replica (bench builds only), read once the clients are connected")
	fs.StringVar(&o.heapProf, "heap-profile", "", "where to write that profile")
	fs.IntVar(&o.maxRecv, "max-recv-mib", 64, "largest response a client takes, MiB")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	var problems []string
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	if o.xds == "" {
		problems = append(problems, "--xds is required")
	}
	if !strings.HasPrefix(o.api, "http://") && !strings.HasPrefix(o.api, "https://") {
		problems = append(problems, "--api: want http://ip:port")
	}
	o.api = strings.TrimSuffix(o.api, "/")
	if o.files.CA == "" || o.files.Cert == "" || o.files.Key == "" {
		problems = append(problems, "--tls-ca, --tls-cert and --tls-key are required")
	}
	if a, b, ok := strings.Cut(units, ","); !ok || a == "" || b == "" || a == b {
		problems = append(problems, "--units: want two different units, a,b")
	} else {
		o.units = [2]string{a, b}
	}
	if o.clients < 1 || o.clients > 100000 {
		problems = append(problems, "--clients: want 1..100000")
	}
	if o.rounds < 1 {
		problems = append(problems, "--rounds must be positive")
	}
	if o.dialers < 1 {
		problems = append(problems, "--dialers must be positive")
	}
	if (o.cpuProf == "") != (o.cpuURL == "") {
		problems = append(problems, "--cpu-profile and --cpu-profile-url go together")
	}
	if (o.heapProf == "") != (o.heapURL == "") {
		problems = append(problems, "--heap-profile and --heap-profile-url go together")
	}
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			problems = append(problems, fmt.Sprintf("--token-file: %v", err))
		}
		o.token = strings.TrimSpace(string(b))
	}
	if len(problems) > 0 {
		return o, errors.New(strings.Join(problems, "; "))
	}
	return o, nil
}

// arrivals records, for each map version, when each client received it
// and sent its ACK.
type arrivals struct {
	mu sync.Mutex
	by map[uint64]*arrival
	// gone counts the streams that ended; first is the first one's error.
	gone  int
	first error
}

// lost records a stream that ended.
func (a *arrivals) lost(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.gone++; a.first == nil {
		a.first = err
	}
}

type arrival struct {
	recv []time.Time // one per client that received the version
	ack  time.Time   // the last ACK sent
	all  chan struct{}
}

func (a *arrivals) get(v uint64, n int) *arrival {
	r := a.by[v]
	if r == nil {
		r = &arrival{recv: make([]time.Time, 0, n), all: make(chan struct{})}
		a.by[v] = r
	}
	return r
}

// got records one client's receipt (recv) and ACK (ack) of version v; n
// clients in all.
func (a *arrivals) got(v uint64, recv, ack time.Time, n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.get(v, n)
	r.recv = append(r.recv, recv)
	if ack.After(r.ack) {
		r.ack = ack
	}
	if len(r.recv) == n {
		close(r.all)
	}
}

// wait returns the arrivals of v once every one of n clients has it.
func (a *arrivals) wait(ctx context.Context, v uint64, n int) (*arrival, error) {
	a.mu.Lock()
	r := a.get(v, n)
	a.mu.Unlock()
	select {
	case <-r.all:
	case <-ctx.Done():
		a.mu.Lock()
		got, gone, first := len(r.recv), a.gone, a.first
		a.mu.Unlock()
		if gone > 0 {
			return nil, fmt.Errorf("version %d: %d of %d clients received it; %d streams ended, the first with: %w", v, got, n, gone, first)
		}
		return nil, fmt.Errorf("version %d: %d of %d clients received it: %w", v, got, n, ctx.Err())
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return &arrival{recv: slices.Clone(r.recv), ack: r.ack}, nil
}

// mapVersion reads field 1 (version) of a serialized cellmesh.v1.ShardMap
// without decoding the rest: the clients stay cheap, so that the machine's
// CPU goes to the control plane.
func mapVersion(b []byte) (uint64, error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0, protowire.ParseError(n)
			}
			return v, nil
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return 0, protowire.ParseError(n)
		}
		b = b[n:]
	}
	return 0, nil // version 0 is not sent
}

// client runs one ADS stream: it subscribes, ACKs every response and
// records the map versions. ready is called once, with the first map's
// size, or with the error that ended the stream before.
func client(ctx context.Context, o options, creds credentials.TransportCredentials, id int, arr *arrivals, ready func(int, error)) {
	var once sync.Once
	done := func(size int, err error) { once.Do(func() { ready(size, err) }) }
	err := func() error {
		codec := newLightCodec()
		conn, err := grpc.NewClient(o.xds, grpc.WithTransportCredentials(creds),
			grpc.WithStaticStreamWindowSize(xdsapi.FlowWindow), grpc.WithStaticConnWindowSize(xdsapi.FlowWindow), // as a sidecar
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(o.maxRecv<<20), grpc.ForceCodecV2(codec)))
		if err != nil {
			return err
		}
		defer conn.Close()
		st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		node := &core.Node{Id: "xdsload-" + strconv.Itoa(id), Cluster: "xdsload"}
		first := &discovery.DiscoveryRequest{Node: node, TypeUrl: xdsapi.ShardMapType, ResourceNames: []string{xdsapi.ShardMapName}}
		if o.clusters {
			first = &discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}
			if err := st.Send(first); err != nil {
				return err
			}
			first = &discovery.DiscoveryRequest{TypeUrl: xdsapi.ShardMapType, ResourceNames: []string{xdsapi.ShardMapName}}
		}
		if err := st.Send(first); err != nil {
			return err
		}
		for {
			r, err := st.Recv()
			if err != nil {
				return err
			}
			recv := time.Now()
			ack := &discovery.DiscoveryRequest{TypeUrl: r.TypeUrl, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}
			if r.TypeUrl == xdsapi.ShardMapType {
				ack.ResourceNames = []string{xdsapi.ShardMapName}
			}
			if err := st.Send(ack); err != nil {
				return err
			}
			if r.TypeUrl != xdsapi.ShardMapType {
				continue
			}
			sent := time.Now()
			if len(r.Resources) != 1 {
				return fmt.Errorf("shard map response with %d resources", len(r.Resources))
			}
			v, err := mapVersion(r.Resources[0].GetValue())
			if err != nil {
				return fmt.Errorf("shard map: %w", err)
			}
			arr.got(v, recv, sent, o.clients)
			done(codec.size, nil)
		}
	}()
	if ctx.Err() == nil {
		err = fmt.Errorf("client %d: %w", id, err)
		arr.lost(err)
		done(0, err)
	}
}

// scrape reads the replica's /metrics: the sum of the samples of each
// wanted series (a name, or a name with a label matcher such as
// `cellmesh_xds_acks_total{type="shardmap",result="ack"}`, labels in the
// order exposed).
func scrape(ctx context.Context, hc *http.Client, api string, want ...string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, api+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/metrics: %s", resp.Status)
	}
	got := make(map[string]float64, len(want))
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		series, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		for _, w := range want {
			name, labels, hasLabels := strings.Cut(w, "{")
			sname, slabels, _ := strings.Cut(series, "{")
			if sname != name || (hasLabels && !strings.Contains(slabels, strings.TrimSuffix(labels, "}"))) {
				continue
			}
			f, err := strconv.ParseFloat(strings.Fields(val)[0], 64)
			if err != nil {
				return nil, fmt.Errorf("/metrics: %s: %w", series, err)
			}
			got[w] += f
		}
	}
	return got, sc.Err()
}

const (
	mCPU       = "process_cpu_seconds_total"
	mRSS       = "process_resident_memory_bytes"
	mHeap      = "go_memstats_heap_inuse_bytes"
	mGoroutine = "go_goroutines"
	mConnected = "cellmesh_xds_connected_clients"
	mAcks      = `cellmesh_xds_acks_total{result="ack",type="shardmap"}`
)

var allMetrics = []string{mCPU, mRSS, mHeap, mGoroutine, mConnected, mAcks}

// move asks the replica to move the shard to unit; it returns the map
// version of the answer.
func move(ctx context.Context, hc *http.Client, o options, unit string) (uint64, error) {
	body, _ := json.Marshal(map[string]string{"to": unit})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("%s/v1/shards/%d/move", o.api, o.shard), bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	if o.token != "" {
		req.Header.Set("Authorization", "Bearer "+o.token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("move shard %d to %s: %s: %s", o.shard, unit, resp.Status, bytes.TrimSpace(b))
	}
	var res struct {
		Version uint64 `json:"version"`
		To      string `json:"to"`
	}
	if err := json.Unmarshal(b, &res); err != nil {
		return 0, fmt.Errorf("move answer %q: %w", b, err)
	}
	if res.To != unit || res.Version == 0 {
		return 0, fmt.Errorf("move answer %s: want shard %d on %s at a version", b, o.shard, unit)
	}
	return res.Version, nil
}

// shardUnit returns the unit the shard is on.
func shardUnit(ctx context.Context, hc *http.Client, o options) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/v1/shards/%d", o.api, o.shard), nil)
	if err != nil {
		return "", err
	}
	if o.token != "" {
		req.Header.Set("Authorization", "Bearer "+o.token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("shard %d: %s: %s", o.shard, resp.Status, bytes.TrimSpace(b))
	}
	var sh struct {
		Unit string `json:"unit"`
	}
	if err := json.Unmarshal(b, &sh); err != nil {
		return "", fmt.Errorf("shard %d: %q: %w", o.shard, b, err)
	}
	return sh.Unit, nil
}

// round is one move and when the clients had it.
type round struct {
	version                        uint64
	sent, accepted                 time.Time
	lastRecv, lastAck, serverAcked time.Time
	medianRecv                     time.Time
}

type result struct {
	o          options
	mapBytes   int
	connect    time.Duration
	rounds     []round
	before     map[string]float64 // no client connected
	connected  map[string]float64 // every client connected, settled
	after      map[string]float64 // after the rounds
	idleCPU    float64            // seconds per move with no client
	scrapeCPU  float64            // seconds per /metrics scrape
	roundsCPU  float64            // seconds over the rounds, scrapes taken out
	loadCPU    time.Duration      // this process's, over the rounds
	initialVer uint64
}

// mover moves the shard back and forth.
type mover struct {
	o    options
	hc   *http.Client
	next int // index in o.units of the next move's target
}

func (m *mover) move(ctx context.Context) (uint64, error) {
	v, err := move(ctx, m.hc, m.o, m.o.units[m.next])
	if err == nil {
		m.next = 1 - m.next
	}
	return v, err
}

// cpu reads the replica's CPU seconds, counting the scrape.
func cpu(ctx context.Context, hc *http.Client, api string, scrapes *int) (float64, error) {
	*scrapes++
	m, err := scrape(ctx, hc, api, mCPU)
	return m[mCPU], err
}

func run(ctx context.Context, o options) (*result, error) {
	tlsStore, err := meshtls.Load(o.files, nil)
	if err != nil {
		return nil, err
	}
	creds := credentials.NewTLS(tlsStore.ClientConfig(func(peer meshtls.ID) error {
		if peer.Service != meshtls.ControlPlaneService {
			return fmt.Errorf("xDS server %s is not a control-plane replica", peer)
		}
		return nil
	}, nil))
	hc := &http.Client{Timeout: 30 * time.Second}
	res := &result{o: o}
	if res.before, err = scrape(ctx, hc, o.api, allMetrics...); err != nil {
		return nil, fmt.Errorf("before connecting: %w", err)
	}
	if c := res.before[mConnected]; c != 0 {
		return nil, fmt.Errorf("the replica already has %v xDS clients: measure on a replica of its own", c)
	}
	mv := &mover{o: o, hc: hc}
	at, err := shardUnit(ctx, hc, o)
	if err != nil {
		return nil, err
	}
	if at == o.units[0] {
		mv.next = 1
	}

	// What a move costs the replica with no client: raft, the API, the
	// build of the resources.
	var scrapes int
	c0, err := cpu(ctx, hc, o.api, &scrapes)
	if err != nil {
		return nil, err
	}
	for i := range o.idleMoves {
		if _, err := mv.move(ctx); err != nil {
			return nil, fmt.Errorf("move %d without clients: %w", i+1, err)
		}
		time.Sleep(o.interval)
	}
	c1, err := cpu(ctx, hc, o.api, &scrapes)
	if err != nil {
		return nil, err
	}
	if o.idleMoves > 0 {
		res.idleCPU = (c1 - c0) / float64(o.idleMoves)
	}

	// Connect every client, --dialers at a time, each waiting for its
	// first map before the next one starts.
	cctx, stop := context.WithCancel(ctx)
	defer stop()
	arr := &arrivals{by: map[uint64]*arrival{}}
	var (
		wg       sync.WaitGroup
		failed   atomic.Pointer[error]
		mapBytes atomic.Int64
	)
	slots := make(chan struct{}, o.dialers)
	start := time.Now()
	for i := range o.clients {
		if failed.Load() != nil {
			break
		}
		slots <- struct{}{}
		wg.Add(1)
		go client(cctx, o, creds, i, arr, func(size int, err error) {
			if err != nil {
				failed.CompareAndSwap(nil, &err)
			} else {
				mapBytes.Store(int64(size))
			}
			<-slots
			wg.Done()
		})
	}
	wg.Wait()
	if p := failed.Load(); p != nil {
		return nil, fmt.Errorf("connecting %d clients: %w", o.clients, *p)
	}
	res.connect = time.Since(start)
	res.mapBytes = int(mapBytes.Load())
	arr.mu.Lock()
	for v, a := range arr.by {
		if len(a.recv) == o.clients {
			res.initialVer = max(res.initialVer, v)
		}
	}
	arr.mu.Unlock()
	if res.initialVer == 0 {
		return nil, errors.New("the clients connected holding different map versions; is something else moving shards?")
	}
	fmt.Fprintf(os.Stderr, "xdsload: %d clients connected in %.1fs, map version %d, %d bytes\n", o.clients, res.connect.Seconds(), res.initialVer, res.mapBytes)

	time.Sleep(o.settle)
	if res.connected, err = scrape(ctx, hc, o.api, allMetrics...); err != nil {
		return nil, err
	}
	if c := res.connected[mConnected]; int(c) != o.clients {
		return nil, fmt.Errorf("the replica counts %v xDS clients, want %d", c, o.clients)
	}
	if o.heapURL != "" {
		if err := fetch(ctx, o.heapURL, o.heapProf); err != nil {
			return nil, fmt.Errorf("heap profile: %w", err)
		}
	}

	// What one scrape of /metrics costs the replica (with every client
	// connected: the process collector counts the open files), to take
	// the scrapes of the rounds out of their CPU.
	const calib = 50
	n := 0
	c0, err = cpu(ctx, hc, o.api, &n)
	if err != nil {
		return nil, err
	}
	for range calib - 1 {
		if _, err := cpu(ctx, hc, o.api, &n); err != nil {
			return nil, err
		}
	}
	c1, err = cpu(ctx, hc, o.api, &n)
	if err != nil {
		return nil, err
	}
	res.scrapeCPU = (c1 - c0) / calib

	var prof chan error
	if o.cpuURL != "" {
		prof = make(chan error, 1)
		go func() { prof <- fetch(ctx, o.cpuURL, o.cpuProf) }()
		time.Sleep(200 * time.Millisecond)
	}
	var ru0, ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	scrapes = 0
	c0, err = cpu(ctx, hc, o.api, &scrapes)
	if err != nil {
		return nil, err
	}
	acks := res.connected[mAcks]
	for i := range o.rounds {
		var r round
		r.sent = time.Now()
		v, err := mv.move(ctx)
		r.accepted = time.Now()
		if err != nil {
			return nil, fmt.Errorf("round %d: %w", i+1, err)
		}
		r.version = v
		wctx, cancel := context.WithTimeout(ctx, o.timeout)
		a, err := arr.wait(wctx, v, o.clients)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("round %d: %w", i+1, err)
		}
		// The server counts the ACKs a moment later: poll it (each
		// client ACKs every version once).
		acks += float64(o.clients)
		for {
			scrapes++
			m, err := scrape(wctx, hc, o.api, mAcks)
			if err != nil {
				cancel()
				return nil, fmt.Errorf("round %d: %w", i+1, err)
			}
			if m[mAcks] >= acks {
				r.serverAcked = time.Now()
				break
			}
			time.Sleep(time.Millisecond)
		}
		cancel()
		slices.SortFunc(a.recv, func(x, y time.Time) int { return x.Compare(y) })
		r.lastRecv, r.lastAck, r.medianRecv = a.recv[len(a.recv)-1], a.ack, a.recv[len(a.recv)/2]
		res.rounds = append(res.rounds, r)
		time.Sleep(o.interval)
	}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	res.loadCPU = time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	if res.after, err = scrape(ctx, hc, o.api, allMetrics...); err != nil {
		return nil, err
	}
	res.roundsCPU = res.after[mCPU] - c0 - float64(scrapes)*res.scrapeCPU
	if prof != nil {
		if err := <-prof; err != nil {
			return nil, fmt.Errorf("cpu profile: %w", err)
		}
	}
	if o.roundsOut != "" {
		if err := res.writeRounds(o.roundsOut); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// fetch saves what url answers to file (a pprof profile).
func fetch(ctx context.Context, url, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// pct is the nearest-rank percentile p (0-100) of sorted xs.
func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(xs)))) - 1
	return xs[max(0, min(i, len(xs)-1))]
}

func (r *result) series(f func(round) time.Duration) []float64 {
	xs := make([]float64, 0, len(r.rounds))
	for _, rd := range r.rounds {
		xs = append(xs, ms(f(rd)))
	}
	slices.Sort(xs)
	return xs
}

func (r *result) writeRounds(file string) error {
	var b strings.Builder
	b.WriteString("round,version,api_ms,last_recv_ms,last_ack_ms,server_acked_ms,median_recv_ms,sent_to_last_recv_ms\n")
	for i, rd := range r.rounds {
		fmt.Fprintf(&b, "%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f\n", i+1, rd.version, ms(rd.accepted.Sub(rd.sent)),
			ms(rd.lastRecv.Sub(rd.accepted)), ms(rd.lastAck.Sub(rd.accepted)), ms(rd.serverAcked.Sub(rd.accepted)),
			ms(rd.medianRecv.Sub(rd.accepted)), ms(rd.lastRecv.Sub(rd.sent)))
	}
	return os.WriteFile(file, []byte(b.String()), 0o644)
}

func (r *result) String() string {
	var b strings.Builder
	n := float64(r.o.clients)
	fmt.Fprintf(&b, "clients=%d rounds=%d map_bytes=%d connect_s=%.1f", r.o.clients, len(r.rounds), r.mapBytes, r.connect.Seconds())
	three := func(name string, f func(round) time.Duration) {
		xs := r.series(f)
		fmt.Fprintf(&b, " %s_p50_ms=%.1f %s_p99_ms=%.1f %s_max_ms=%.1f", name, pct(xs, 50), name, pct(xs, 99), name, xs[len(xs)-1])
	}
	three("last", func(rd round) time.Duration { return rd.lastRecv.Sub(rd.accepted) })
	three("sent_last", func(rd round) time.Duration { return rd.lastRecv.Sub(rd.sent) })
	three("ack", func(rd round) time.Duration { return rd.lastAck.Sub(rd.accepted) })
	three("srvack", func(rd round) time.Duration { return rd.serverAcked.Sub(rd.accepted) })
	api := r.series(func(rd round) time.Duration { return rd.accepted.Sub(rd.sent) })
	fmt.Fprintf(&b, " api_p50_ms=%.1f api_max_ms=%.1f", pct(api, 50), api[len(api)-1])
	med := r.series(func(rd round) time.Duration { return rd.medianRecv.Sub(rd.accepted) })
	fmt.Fprintf(&b, " client_p50_ms=%.1f", pct(med, 50))
	perMove := r.roundsCPU / float64(len(r.rounds))
	fmt.Fprintf(&b, " cp_cpu_s=%.2f cp_cpu_ms_per_move=%.2f cp_idle_cpu_ms_per_move=%.2f cp_scrape_cpu_ms=%.2f cp_cpu_us_per_push_client=%.1f",
		r.roundsCPU, perMove*1e3, r.idleCPU*1e3, r.scrapeCPU*1e3, (perMove-r.idleCPU)/n*1e6)
	mib := func(x float64) float64 { return x / (1 << 20) }
	fmt.Fprintf(&b, " cp_rss_before_mib=%.1f cp_rss_mib=%.1f cp_rss_after_mib=%.1f cp_heap_before_mib=%.1f cp_heap_mib=%.1f",
		mib(r.before[mRSS]), mib(r.connected[mRSS]), mib(r.after[mRSS]), mib(r.before[mHeap]), mib(r.connected[mHeap]))
	fmt.Fprintf(&b, " cp_rss_kib_per_client=%.1f cp_heap_kib_per_client=%.1f cp_goroutines_per_client=%.2f",
		(r.connected[mRSS]-r.before[mRSS])/1024/n, (r.connected[mHeap]-r.before[mHeap])/1024/n,
		(r.connected[mGoroutine]-r.before[mGoroutine])/n)
	fmt.Fprintf(&b, " load_cpu_s=%.2f", r.loadCPU.Seconds())
	return b.String()
}
