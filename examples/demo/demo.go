package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/cellmesh/cellmesh/examples/ledger"
)

// Options configure a demo run.
type Options struct {
	// Bin is the cellmesh binary the processes run (os.Executable).
	Bin string
	// Dir holds certificates, data and logs; empty: a temporary directory,
	// removed at the end.
	Dir string
	// Duration ends the run; 0: it runs until ctx ends.
	Duration time.Duration
	// Users is how many users the load generator plays (default 2000);
	// Rate its requests per second over all units (default 100).
	Users int
	Rate  int
	// Progress gets one line every ProgressEvery (default 10 s) and the
	// addresses at the start.
	Progress      io.Writer
	ProgressEvery time.Duration
	Log           *slog.Logger
	// Drills run through the control plane at their times from the
	// load's start.
	Drills []DrillSpec
}

// Report is what a run did, written as JSON by --report.
type Report struct {
	Started  time.Time `json:"started"`
	Ended    time.Time `json:"ended"`
	Seconds  float64   `json:"seconds"`
	Regions  []string  `json:"regions"`
	Units    []Unit    `json:"units"`
	Replicas []Replica `json:"replicas"`
	Load     Load      `json:"load"`
	// Drills are the scheduled drills with the control plane's reports.
	Drills []DrillResult `json:"drills,omitempty"`
	// Check is the end-of-run check that no acknowledged write is lost
	// (absent when the data directory held data from an earlier run).
	Check *Check `json:"acknowledged_writes_check,omitempty"`
}

// Unit is a unit of the demo with the addresses of its processes.
type Unit struct {
	Name     string `json:"name"`
	Region   string `json:"region"`
	Outbound string `json:"outbound"` // the sidecar's port for the unit's clients
	Admin    string `json:"admin"`    // the sidecar's admin port (/metrics, /config)
	App      string `json:"app"`      // the ledger
}

// Replica is a control-plane replica of the demo.
type Replica struct {
	ID     string `json:"id"`
	Region string `json:"region"`
	API    string `json:"api"`
	XDS    string `json:"xds"`
}

// Load is what the load generator sent and got.
type Load struct {
	Users        int              `json:"users"`
	Requests     int64            `json:"requests"`
	Reads        int64            `json:"reads"`
	Writes       int64            `json:"writes"`
	WritesAcked  int64            `json:"writes_acked"`
	ClientErrors int64            `json:"client_errors"`
	ErrorKinds   map[string]int64 `json:"error_kinds,omitempty"`
	ByUnit       map[string]int64 `json:"requests_by_unit"`
}

// topology is the part of the ledger's topology file the demo needs.
type topology struct {
	Regions []struct {
		Name string `yaml:"name"`
	} `yaml:"regions"`
	Units []struct {
		Name   string `yaml:"name"`
		Region string `yaml:"region"`
	} `yaml:"units"`
}

// Demo is a running demo.
type Demo struct {
	opts    Options
	dir     string
	tmp     bool
	token   string
	certs   string
	gossip  string
	report  Report
	procs   []*proc
	stopped bool
	fresh   bool // the ledgers start empty: balances are the load's alone
}

// proc is a process the demo started.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start brings the whole mesh up: certificates, the replicas, then a
// ledger and a sidecar per unit; it returns once every sidecar is ready
// and every unit takes a write. On error what was started is stopped.
func Start(ctx context.Context, opts Options) (d *Demo, err error) {
	if opts.Bin == "" {
		return nil, errors.New("demo: no cellmesh binary given")
	}
	if opts.Users <= 0 {
		opts.Users = 2000
	}
	if opts.Rate <= 0 {
		opts.Rate = 100
	}
	if opts.ProgressEvery <= 0 {
		opts.ProgressEvery = 10 * time.Second
	}
	if opts.Progress == nil {
		opts.Progress = io.Discard
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	dm := &Demo{opts: opts, dir: opts.Dir}
	if dm.dir == "" {
		if dm.dir, err = os.MkdirTemp("", "cellmesh-demo-"); err != nil {
			return nil, err
		}
		dm.tmp = true
	}
	defer func() {
		if err != nil {
			dm.Stop() // what was started (d is nil by then)
		}
	}()
	d = dm
	var topo topology
	if err := yaml.Unmarshal(ledger.Topology, &topo); err != nil {
		return nil, fmt.Errorf("demo: the ledger topology: %w", err)
	}
	for _, r := range topo.Regions {
		d.report.Regions = append(d.report.Regions, r.Name)
	}
	var unitNames []string
	for _, u := range topo.Units {
		unitNames = append(unitNames, u.Name)
	}
	if err := checkDrills(opts.Drills, d.report.Regions, unitNames); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	if entries, err := os.ReadDir(filepath.Join(d.dir, "data")); d.tmp || err != nil || len(entries) == 0 {
		d.fresh = true
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	d.token = hex.EncodeToString(b)
	for _, sub := range []string{"logs", "data", "certs"} {
		if err := os.MkdirAll(filepath.Join(d.dir, sub), 0o700); err != nil {
			return nil, err
		}
	}
	d.certs = filepath.Join(d.dir, "certs")
	topoPath := filepath.Join(d.dir, "topology.yaml")
	if err := os.WriteFile(topoPath, ledger.Topology, 0o600); err != nil {
		return nil, err
	}
	fmt.Fprintf(opts.Progress, "cellmesh demo: %d regions x %d units, %d control-plane replicas, the ledger behind every sidecar; files in %s\n",
		len(topo.Regions), len(topo.Units)/max(1, len(topo.Regions)), len(topo.Regions), d.dir)
	if _, err := d.cli(ctx, "certs", "init", "--dir", d.certs, "--trust-domain", "cellmesh.demo"); err != nil {
		return nil, err
	}
	key, err := d.cli(ctx, "gossip-key")
	if err != nil {
		return nil, err
	}
	d.gossip = filepath.Join(d.dir, "gossip.key")
	if err := os.WriteFile(d.gossip, key, 0o600); err != nil {
		return nil, err
	}

	// The replicas, one per region; the first holds the topology.
	var seeds []string
	for i, region := range d.report.Regions {
		r := Replica{ID: "cp-" + region, Region: region, API: freeAddr("tcp"), XDS: freeAddr("tcp")}
		if _, err := d.cli(ctx, "certs", "issue", "--dir", d.certs, "--region", region, "--unit", r.ID, "--service", "cellmesh-controlplane"); err != nil {
			return nil, err
		}
		name := r.ID + "-cellmesh-controlplane"
		g := freeAddr("gossip")
		seeds = append(seeds, g)
		args := []string{"controlplane", "--id", r.ID, "--region", region, "--data-dir", filepath.Join(d.dir, "data", r.ID),
			"--raft", freeAddr("tcp"), "--api", r.API, "--xds", r.XDS,
			"--tls-ca", filepath.Join(d.certs, "ca.pem"), "--tls-cert", filepath.Join(d.certs, name+".pem"), "--tls-key", filepath.Join(d.certs, name+"-key.pem"),
			"--gossip", g, "--gossip-profile", "fast", "--gossip-key-file", d.gossip, "--handoff-service", "ledger"}
		if i == 0 {
			args = append(args, "--topology", topoPath)
		} else {
			args = append(args, "--join", d.report.Replicas[0].API, "--gossip-join", seeds[0])
		}
		if err := d.start(r.ID, args...); err != nil {
			return nil, err
		}
		d.report.Replicas = append(d.report.Replicas, r)
	}
	fmt.Fprintln(opts.Progress, "  waiting for the replicas to elect a leader...")
	if err := d.waitUntil(ctx, "the replicas to elect a leader", 90*time.Second, d.hasLeader); err != nil {
		return nil, err
	}

	// A ledger and a sidecar per unit.
	var servers []string
	for _, r := range d.report.Replicas {
		servers = append(servers, r.XDS)
	}
	for _, tu := range topo.Units {
		u := Unit{Name: tu.Name, Region: tu.Region, Outbound: freeAddr("tcp"), Admin: freeAddr("tcp"), App: freeAddr("tcp")}
		if _, err := d.cli(ctx, "certs", "issue", "--dir", d.certs, "--region", u.Region, "--unit", u.Name, "--service", "ledger"); err != nil {
			return nil, err
		}
		cfg := fmt.Sprintf(`identity: {region: %s, unit: %s, service: ledger}
app: %s
listen: {outbound: %s, inbound_quic: %s, inbound_tcp: %s, admin: %s}
tls: {ca: certs/ca.pem, cert: certs/%s-ledger.pem, key: certs/%s-ledger-key.pem}
drain_timeout: 10s
misroute_correction: true
xds: {servers: [%s], advertise: quic}
gossip: {bind: %s, join: [%s], profile: fast, key_file: %s}
`, u.Region, u.Name, u.App, u.Outbound, freeAddr("udp"), freeAddr("tcp"), u.Admin, u.Name, u.Name,
			strings.Join(servers, ", "), freeAddr("gossip"), strings.Join(seeds, ", "), d.gossip)
		cfgPath := filepath.Join(d.dir, u.Name+".yaml")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			return nil, err
		}
		if err := d.start(u.Name+"-ledger", "ledger", "--unit", u.Name, "--region", u.Region, "--listen", u.App,
			"--data-dir", filepath.Join(d.dir, "data", u.Name), "--mesh", u.Outbound, "--sidecar-admin", u.Admin); err != nil {
			return nil, err
		}
		if err := d.start(u.Name+"-sidecar", "sidecar", "--config", cfgPath); err != nil {
			return nil, err
		}
		d.report.Units = append(d.report.Units, u)
	}
	fmt.Fprintln(opts.Progress, "  waiting for every unit to take writes...")
	for _, u := range d.report.Units {
		if err := d.waitUntil(ctx, u.Name+" to take a write", 90*time.Second, func() bool { return d.probeWrite(u) }); err != nil {
			return nil, err
		}
	}
	leader := d.leaderAPI()
	fmt.Fprintf(opts.Progress, `cellmesh demo is up:
  control plane API: http://%s (leader; every replica answers: %s)
  token:             %s
  try:               CELLMESH_TOKEN=%s %s status --api %s
`, leader, d.apis(), d.token, d.token, opts.Bin, leader)
	for _, u := range d.report.Units {
		fmt.Fprintf(opts.Progress, "  unit %-5s (%s): clients send to http://%s with x-cellmesh-uid; metrics http://%s/metrics\n", u.Name, u.Region, u.Outbound, u.Admin)
	}
	return d, nil
}

// Run starts the mesh, runs the load until ctx ends or the duration
// passes, stops everything and returns the report.
func Run(ctx context.Context, opts Options) (*Report, error) {
	d, err := Start(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer d.Stop()
	d.report.Started = time.Now().UTC()
	runCtx := ctx
	if opts.Duration > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, opts.Duration)
		defer cancel()
	}
	g := newLoad(d, d.opts.Users, d.opts.Rate)
	start := time.Now()
	results := make([]DrillResult, len(d.opts.Drills))
	var wg sync.WaitGroup
	for i, spec := range d.opts.Drills {
		wg.Add(1)
		go func() { defer wg.Done(); results[i] = d.runDrill(runCtx, start, spec, d.opts.Progress) }()
	}
	g.run(runCtx, d.opts.Progress, d.opts.ProgressEvery)
	wg.Wait() // a drill under way when the load stops goes on to its end
	d.report.Drills = results
	d.report.Ended = time.Now().UTC()
	d.report.Seconds = d.report.Ended.Sub(d.report.Started).Seconds()
	d.report.Load = g.result()
	if d.fresh {
		fmt.Fprintln(d.opts.Progress, "checking that no acknowledged write is lost: reading every account the load wrote to...")
		c := g.check(context.WithoutCancel(ctx))
		d.report.Check = &c
		fmt.Fprintf(d.opts.Progress, "check: %d accounts, %d match their acknowledged writes, %d mismatch, %d unreadable, %d with a write of unknown outcome (not compared)\n",
			c.Accounts, c.Verified, c.Lost, c.Unreadable, c.Uncertain)
	}
	fmt.Fprintln(d.opts.Progress, "stopping: the load, then the sidecars and ledgers, then the replicas...")
	if err := d.Stop(); err != nil {
		return &d.report, err
	}
	r := d.report
	return &r, nil
}

// start runs the cellmesh binary with args as process name, its output in
// logs/name.log.
func (d *Demo) start(name string, args ...string) error {
	f, err := os.Create(filepath.Join(d.dir, "logs", name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(d.opts.Bin, args...)
	cmd.Env = append(os.Environ(), "CELLMESH_TOKEN="+d.token)
	cmd.Dir = d.dir
	// Should the demo die without its cleanup (a crash, SIGKILL), its
	// processes are told to stop too, rather than left running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("demo: start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	d.procs = append(d.procs, p)
	d.opts.Log.Debug("started", "process", name, "pid", cmd.Process.Pid)
	return nil
}

// Stop stops every process: the units first, then the replicas, each with
// SIGTERM and up to 20 s to finish, then SIGKILL; it removes a temporary
// directory. It reports the processes that did not stop cleanly.
func (d *Demo) Stop() error {
	if d.stopped {
		return nil
	}
	d.stopped = true
	var units, replicas []*proc
	for _, p := range d.procs {
		if strings.HasPrefix(p.name, "cp-") {
			replicas = append(replicas, p)
		} else {
			units = append(units, p)
		}
	}
	var errs []error
	for _, group := range [][]*proc{units, replicas} {
		for _, p := range group {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range group {
			select {
			case <-p.done:
			case <-time.After(20 * time.Second):
				_ = p.cmd.Process.Kill()
				<-p.done
				errs = append(errs, fmt.Errorf("%s did not stop within 20s of SIGTERM: killed (see logs/%s.log)", p.name, p.name))
				continue
			}
			var ee *exec.ExitError
			if errors.As(p.err, &ee) && !ee.Exited() {
				continue // killed by a signal before (a drill)
			}
			if p.err != nil {
				errs = append(errs, fmt.Errorf("%s: %w (see logs/%s.log)", p.name, p.err, p.name))
			}
		}
	}
	if d.tmp {
		_ = os.RemoveAll(d.dir)
	}
	return errors.Join(errs...)
}

// cli runs the cellmesh binary to its end and returns its output.
func (d *Demo) cli(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, d.opts.Bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("demo: cellmesh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// waitUntil polls cond every 100 ms until it holds, ctx ends or limit
// passes; it fails early when a process of the demo exited.
func (d *Demo) waitUntil(ctx context.Context, what string, limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		for _, p := range d.procs {
			select {
			case <-p.done:
				return fmt.Errorf("demo: %s exited while waiting for %s: %v (see %s)", p.name, what, p.err, filepath.Join(d.dir, "logs", p.name+".log"))
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("demo: timed out after %s waiting for %s (logs in %s)", limit, what, filepath.Join(d.dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

var apiClient = &http.Client{Timeout: 5 * time.Second}

// members reads a replica's /v1/members.
func (d *Demo) members(api string) (leader string, replicas int, ok bool) {
	var m struct {
		Leader   string
		Replicas []struct{ ID string }
	}
	raw, err := d.apiAt(context.Background(), api, "GET", "/v1/members", nil)
	if err != nil || json.Unmarshal(raw, &m) != nil {
		return "", 0, false
	}
	return m.Leader, len(m.Replicas), true
}

func (d *Demo) hasLeader() bool {
	leader, n, ok := d.members(d.report.Replicas[0].API)
	return ok && leader != "" && n == len(d.report.Replicas)
}

// leaderAPI is the API address of the raft leader (the first replica's
// when none is known).
func (d *Demo) leaderAPI() string {
	for _, r := range d.report.Replicas {
		if leader, _, ok := d.members(r.API); ok {
			for _, o := range d.report.Replicas {
				if o.ID == leader {
					return o.API
				}
			}
		}
	}
	return d.report.Replicas[0].API
}

func (d *Demo) apis() string {
	var out []string
	for _, r := range d.report.Replicas {
		out = append(out, r.ID+" "+r.API)
	}
	return strings.Join(out, ", ")
}

// probeWrite deposits 1 to a probe user (shard 0) through the unit's own
// sidecar: the unit is up when the mesh takes the write.
func (d *Demo) probeWrite(u Unit) bool {
	uid := "2088000000000"
	req, _ := http.NewRequest("POST", "http://"+u.Outbound+"/accounts/"+uid+"/deposit", strings.NewReader(`{"amount":1}`))
	req.Host = "ledger"
	req.Header.Set("x-cellmesh-uid", uid)
	req.Header.Set("Idempotency-Key", "demo-probe-"+u.Name+"-"+time.Now().Format(time.RFC3339Nano))
	resp, err := apiClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// handedOut are the addresses freeAddr gave: each once, so two processes
// of the demo never get the same port.
var handedOut sync.Map

// freeAddr is a 127.0.0.1 address free now for network (tcp, udp, or
// gossip: both), not given before.
func freeAddr(network string) string {
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err) // no loopback: nothing of the demo can run
		}
		addr := ln.Addr().String()
		ln.Close()
		if _, given := handedOut.LoadOrStore(addr, true); given {
			continue
		}
		if network == "tcp" {
			return addr
		}
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			continue
		}
		pc.Close()
		return addr
	}
}
