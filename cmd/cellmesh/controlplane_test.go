package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// The control plane as real processes: three replicas (joined through the
// API), four sidecars taking their map and endpoints over xDS, an echo
// behind each, and traffic that must never fail while replicas are killed,
// cut off and restarted.

const cpToken = "process-test-token"

// raftRelay carries one replica's raft traffic, so the test can cut a
// replica off: every replica binds its own loopback IP and dials from it,
// and the relay of replica i forwards connections to it unless i is cut
// or the connection comes from the IP of a cut replica.
type raftRelay struct {
	ln     net.Listener
	target string
	ip     string // the IP of the replica behind it
	cut    *atomic.Value
	mu     sync.Mutex
	conns  map[net.Conn]string // -> source IP
}

func newRaftRelay(t *testing.T, target, ip string, cut *atomic.Value) *raftRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &raftRelay{ln: ln, target: target, ip: ip, cut: cut, conns: map[net.Conn]string{}}
	go r.serve()
	t.Cleanup(func() {
		ln.Close()
		r.drop(func(string) bool { return true })
	})
	return r
}

func (r *raftRelay) blocked(src string) bool {
	c, _ := r.cut.Load().(string)
	return c != "" && (c == r.ip || c == src)
}

func (r *raftRelay) serve() {
	for {
		in, err := r.ln.Accept()
		if err != nil {
			return
		}
		src, _, _ := net.SplitHostPort(in.RemoteAddr().String())
		if r.blocked(src) {
			in.Close()
			continue
		}
		out, err := net.DialTimeout("tcp", r.target, 2*time.Second)
		if err != nil {
			in.Close()
			continue
		}
		r.mu.Lock()
		r.conns[in], r.conns[out] = src, src
		r.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			io.Copy(dst, src)
			dst.Close()
			src.Close()
		}
		go pipe(out, in)
		go pipe(in, out)
	}
}

// drop closes the relayed connections whose source matches.
func (r *raftRelay) drop(match func(src string) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c, src := range r.conns {
		if match(src) {
			c.Close()
			delete(r.conns, c)
		}
	}
}

type cpProc struct {
	id, region string
	ip         string
	api, xds   string
	args       []string
	log        string
	cmd        *exec.Cmd
	done       chan error
	relay      *raftRelay
	dataDir    string
}

type cpMesh struct {
	*procMesh
	certs    string
	replicas []*cpProc
	cut      atomic.Value
	// gossipKey is the keyring file when the mesh gossips ("": it does
	// not); gossipSeeds are the replicas' gossip addresses.
	gossipKey   string
	gossipSeeds []string
}

// api sends an API call to a replica and decodes the answer.
func (cm *cpMesh) api(r *cpProc, method, path, body string, out any) (int, string) {
	cm.t.Helper()
	req, err := http.NewRequest(method, "http://"+r.api+path, strings.NewReader(body))
	if err != nil {
		cm.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+cpToken)
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(data, out); err != nil {
			cm.t.Fatalf("%s %s: %v in %s", method, path, err, data)
		}
	}
	return resp.StatusCode, string(data)
}

type membersJSON struct {
	Replica, Leader string
	Replicas        []struct {
		ID     string
		Voter  bool
		Leader bool
	}
	Endpoints []struct{ Unit, Address, Via string }
}

func (cm *cpMesh) members(r *cpProc) (membersJSON, bool) {
	var m membersJSON
	code, _ := cm.api(r, "GET", "/v1/members", "", &m)
	return m, code == 200
}

// ctl runs the CLI against replica r; it returns the output and exit code.
func (cm *cpMesh) ctl(r *cpProc, args ...string) (string, int) {
	cm.t.Helper()
	ctx, cancel := context.WithTimeout(cm.t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, cm.bin, append(args, "--api", r.api)...)
	cmd.Env = append(os.Environ(), "CELLMESH_TOKEN="+cpToken)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		cm.t.Fatalf("cellmesh %s: %v", strings.Join(args, " "), err)
	}
	return string(out), code
}

func (cm *cpMesh) startReplica(r *cpProc) {
	cm.t.Helper()
	cmd := cm.net.command(r.region, cm.bin, r.args...)
	cmd.Env = append(os.Environ(), "CELLMESH_TOKEN="+cpToken)
	f, err := os.OpenFile(r.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		cm.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		cm.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait(); f.Close(); close(done) }()
	r.cmd, r.done = cmd, done
	cm.t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
	})
}

func (cm *cpMesh) logs() string {
	var b strings.Builder
	for _, r := range cm.replicas {
		data, _ := os.ReadFile(r.log)
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		fmt.Fprintf(&b, "--- %s\n%s\n", r.id, strings.Join(lines, "\n"))
	}
	for _, p := range cm.units {
		data, _ := os.ReadFile(p.sidecarLog)
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		fmt.Fprintf(&b, "--- sidecar %s\n%s\n", p.unit, strings.Join(lines, "\n"))
	}
	return b.String()
}

func (cm *cpMesh) waitUntil(what string, limit time.Duration, cond func() bool) time.Duration {
	cm.t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			cm.t.Fatalf("timed out after %s waiting for %s\n%s", limit, what, cm.logs())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// startCPMesh starts three replicas and the local example's four units
// with their sidecars on xDS; with gossip, every process joins the
// gossip pool (fast profile, encrypted).
func startCPMesh(t *testing.T, gossip bool) *cpMesh {
	t.Helper()
	bin, echoBin := buildBinaries(t)
	topo, err := topofile.Load("../../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cm := &cpMesh{procMesh: &procMesh{t: t, dir: t.TempDir(), bin: bin, by: map[string]*meshProc{}, topo: topo}}
	cm.cut.Store("")
	cm.certs = filepath.Join(cm.dir, "certs")
	cm.cli("certs", "init", "--dir", cm.certs, "--trust-domain", "cellmesh.test")
	if gossip {
		cm.gossipKey = filepath.Join(cm.dir, "gossip.key")
		if err := os.WriteFile(cm.gossipKey, []byte(cm.cli("gossip-key")), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	topoPath := filepath.Join(cm.dir, "topology.yaml")
	data, err := topofile.Encode(topo)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(topoPath, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for i, region := range []string{"us-east", "eu-west", "ap-south"} {
		id := fmt.Sprintf("cp-%d", i+1)
		r := &cpProc{id: id, region: region, ip: fmt.Sprintf("127.0.0.%d", 11+i), api: freeTCP(t), xds: freeTCP(t),
			log: filepath.Join(cm.dir, id+".log"), dataDir: filepath.Join(cm.dir, id)}
		ln, err := net.Listen("tcp", r.ip+":0")
		if err != nil {
			t.Skipf("cannot bind %s (loopback addresses besides 127.0.0.1): %v", r.ip, err)
		}
		raftAddr := ln.Addr().String()
		ln.Close()
		r.relay = newRaftRelay(t, raftAddr, r.ip, &cm.cut)
		cm.cli("certs", "issue", "--dir", cm.certs, "--region", region, "--unit", id, "--service", "cellmesh-controlplane")
		name := id + "-cellmesh-controlplane"
		r.args = []string{"controlplane", "--id", id, "--region", region, "--data-dir", r.dataDir,
			"--raft", raftAddr, "--raft-advertise", r.relay.ln.Addr().String(), "--api", r.api, "--xds", r.xds,
			"--tls-ca", filepath.Join(cm.certs, "ca.pem"), "--tls-cert", filepath.Join(cm.certs, name+".pem"),
			"--tls-key", filepath.Join(cm.certs, name+"-key.pem"), "--log-level", "debug"}
		if gossip {
			ln, err := net.Listen("tcp", r.ip+":0")
			if err != nil {
				t.Fatal(err)
			}
			g := ln.Addr().String()
			ln.Close()
			cm.gossipSeeds = append(cm.gossipSeeds, g)
			r.args = append(r.args, "--gossip", g, "--gossip-profile", "fast", "--gossip-key-file", cm.gossipKey)
			if i > 0 {
				r.args = append(r.args, "--gossip-join", cm.gossipSeeds[0])
			}
		}
		if i == 0 {
			r.args = append(r.args, "--topology", topoPath)
		} else {
			r.args = append(r.args, "--join", cm.replicas[0].api)
		}
		cm.replicas = append(cm.replicas, r)
	}
	for _, r := range cm.replicas {
		cm.startReplica(r)
	}
	cm.waitUntil("three voters, one leader", 60*time.Second, func() bool {
		m, ok := cm.members(cm.replicas[0])
		if !ok || m.Leader == "" || len(m.Replicas) != 3 {
			return false
		}
		for _, r := range m.Replicas {
			if !r.Voter {
				return false
			}
		}
		return true
	})

	var servers []string
	for _, r := range cm.replicas {
		servers = append(servers, r.xds)
	}
	for _, u := range topo.Units {
		p := &meshProc{unit: u.Name, region: u.Region, outbound: freeTCP(t), quic: freeUDP(t), tcp: freeTCP(t), admin: freeTCP(t), app: freeTCP(t)}
		p.configPath = filepath.Join(cm.dir, u.Name+".yaml")
		cm.cli("certs", "issue", "--dir", cm.certs, "--region", u.Region, "--unit", u.Name, "--service", "echo")
		cm.writeSidecarConfig(p, p.configPath, servers)
		p.echoLog = filepath.Join(cm.dir, p.unit+"-echo.log")
		p.echo, p.echoDone = cm.start(p.echoLog, echoBin, "--listen", p.app, "--unit", p.unit, "--region", p.region, "--service", "echo")
		p.sidecarLog = filepath.Join(cm.dir, p.unit+"-sidecar.log")
		p.sidecar, p.sidecarDone = cm.start(p.sidecarLog, bin, "sidecar", "--config", p.configPath, "--log-level", "info")
		cm.units = append(cm.units, p)
		cm.by[u.Name] = p
	}
	for _, p := range cm.units {
		cm.waitHTTP("http://"+p.admin+"/readyz", p)
	}
	cm.waitUntil("every sidecar registered", 30*time.Second, func() bool {
		m, ok := cm.members(cm.replicas[0])
		return ok && len(m.Endpoints) == len(cm.units)
	})
	cm.waitUntil("every sidecar to know every unit's endpoint", 30*time.Second, func() bool {
		for _, p := range cm.units {
			if endpointUnits(p.admin) != len(cm.units) {
				return false
			}
		}
		return true
	})
	return cm
}

// endpointUnits is the number of units a sidecar has endpoints in (/config).
func endpointUnits(admin string) int {
	resp, err := http.Get("http://" + admin + "/config")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var st struct {
		Endpoints []struct{ Unit string } `json:"endpoints"`
	}
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return 0
	}
	units := map[string]bool{}
	for _, e := range st.Endpoints {
		units[e.Unit] = true
	}
	return len(units)
}

func (cm *cpMesh) writeSidecarConfig(p *meshProc, path string, servers []string) {
	cm.t.Helper()
	cm.writeServiceSidecarConfig(p, path, "echo", servers)
}

// writeServiceSidecarConfig writes the file of a sidecar of service on
// xDS (and gossip, when the mesh gossips).
func (cm *cpMesh) writeServiceSidecarConfig(p *meshProc, path, service string, servers []string) {
	cm.t.Helper()
	cfg := fmt.Sprintf(`identity: {region: %s, unit: %s, service: %s}
app: %s
listen: {outbound: %s, inbound_quic: %s, inbound_tcp: %s, admin: %s}
tls: {ca: certs/ca.pem, cert: certs/%s-%s.pem, key: certs/%s-%s-key.pem}
reload_interval: 1h
drain_timeout: 10s
misroute_correction: true
xds: {servers: [%s], advertise: quic}
`, p.region, p.unit, service, p.app, p.outbound, p.quic, p.tcp, p.admin, p.unit, service, p.unit, service, strings.Join(servers, ", "))
	if cm.gossipKey != "" {
		cfg += fmt.Sprintf("gossip: {bind: %s, join: [%s], profile: fast, key_file: %s}\n", cm.net.addr(cm.t, p.region, "gossip"), strings.Join(cm.gossipSeeds, ", "), cm.gossipKey)
	}
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		cm.t.Fatal(err)
	}
}

// mapVersion is the map version a sidecar routes with (/config).
func mapVersion(admin string) uint64 {
	resp, err := http.Get("http://" + admin + "/config")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var st struct {
		MapVersion uint64 `json:"map_version"`
	}
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return 0
	}
	return st.MapVersion
}

// traffic sends requests for users of every shard through every sidecar
// until stopped, and counts the ones that failed.
type traffic struct {
	sent, failed atomic.Int64
	mu           sync.Mutex
	failures     []string
	stop         chan struct{}
	wg           sync.WaitGroup
}

func (cm *cpMesh) startTraffic() *traffic {
	tr := &traffic{stop: make(chan struct{})}
	client := &http.Client{Timeout: 20 * time.Second}
	for i, p := range cm.units {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				uid := strconv.Itoa(2088000000000 + (n*7+i*13)%100)
				req, _ := http.NewRequest("GET", "http://"+p.outbound+"/traffic", nil)
				req.Host = "echo"
				req.Header.Set("x-cellmesh-uid", uid)
				resp, err := client.Do(req)
				tr.sent.Add(1)
				what := ""
				if err != nil {
					what = err.Error()
				} else {
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						what = resp.Status + " " + strings.TrimSpace(string(body))
					}
				}
				if what != "" {
					tr.failed.Add(1)
					tr.mu.Lock()
					if len(tr.failures) < 20 {
						tr.failures = append(tr.failures, fmt.Sprintf("%s via %s uid %s: %s", time.Now().Format("15:04:05.000"), p.unit, uid, what))
					}
					tr.mu.Unlock()
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return tr
}

func (tr *traffic) end() (sent, failed int64, failures []string) {
	close(tr.stop)
	tr.wg.Wait()
	return tr.sent.Load(), tr.failed.Load(), tr.failures
}

// landsAt reports whether a request for uid through unit from reaches unit.
func (cm *cpMesh) landsAt(from, uid, unit string) bool {
	req, _ := http.NewRequest("GET", "http://"+cm.by[from].outbound+"/where", nil)
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var a echoAnswer
	return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&a) == nil && a.Unit == unit
}

// moveAndWatch moves shard to unit through the CLI on replica via and
// returns how long after the CLI's answer every sidecar routed there.
func (cm *cpMesh) moveAndWatch(via *cpProc, shard int, to string) time.Duration {
	cm.t.Helper()
	uid := strconv.Itoa(2088000000000 + shard)
	out, code := cm.ctl(via, "move", strconv.Itoa(shard), "--to", to)
	if code != 0 || !strings.Contains(out, fmt.Sprintf("to %s", to)) {
		cm.t.Fatalf("cellmesh move %d --to %s via %s: exit %d\n%s\n%s", shard, to, via.id, code, out, cm.logs())
	}
	return cm.waitUntil(fmt.Sprintf("shard %d's traffic at %s from every unit", shard, to), 30*time.Second, func() bool {
		for _, p := range cm.units {
			if !cm.landsAt(p.unit, uid, to) {
				return false
			}
		}
		return true
	})
}

func (cm *cpMesh) leader(among ...*cpProc) *cpProc {
	for _, r := range among {
		if m, ok := cm.members(r); ok && m.Leader != "" {
			for _, o := range among {
				if o.id == m.Leader {
					return o
				}
			}
		}
	}
	return nil
}

func metricValue(t *testing.T, text, name string, labels ...string) float64 {
	t.Helper()
	total := 0.0
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			total += v
		}
	}
	return total
}

func TestControlPlaneProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 11 processes")
	}
	cm := startCPMesh(t, false)
	tr := cm.startTraffic()
	defer func() {
		if tr != nil {
			tr.end()
		}
	}()
	r1 := cm.replicas[0]

	// Every unit with a sidecar holds a lease, renewed by the leader.
	for _, p := range cm.units {
		cm.waitUntil(p.unit+"'s lease", 30*time.Second, func() bool {
			return metricValue(t, metricsOf(t, p.admin), "cellmesh_lease_remaining_seconds") > 0
		})
	}

	// The operator's view.
	out, code := cm.ctl(r1, "status")
	for _, want := range []string{"cp-1", "cp-2", "cp-3", "leader", "us-east-1", "eu-west-2"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("cellmesh status (exit %d) lacks %q:\n%s", code, want, out)
		}
	}
	if !regexp.MustCompile(`(?m)^us-east-1\s+us-east\s+rzone\s+unknown\s+25\s+1\s+[0-9.]+m?s\s*$`).MatchString(out) {
		t.Fatalf("cellmesh status does not show us-east-1 with 25 shards, 1 sidecar and a lease:\n%s", out)
	}
	out, code = cm.ctl(r1, "shards", "--region", "eu-west", "--json")
	var shards struct{ Shards []struct{ Region string } }
	if code != 0 || json.Unmarshal([]byte(out), &shards) != nil || len(shards.Shards) != 50 {
		t.Fatalf("cellmesh shards --region eu-west --json (exit %d):\n%s", code, out)
	}
	// Refused moves change nothing and say why.
	if out, code := cm.ctl(r1, "move", "7", "--to", "mars-1"); code != exitError || !strings.Contains(out, `unit "mars-1" is not in topology`) {
		t.Fatalf("move to an unknown unit: exit %d\n%s", code, out)
	}
	if out, code := cm.ctl(r1, "move", "7", "--to", "eu-west-1", "--epoch", "9"); code != exitRefused || !strings.Contains(out, "not 9") {
		t.Fatalf("move at a stale epoch: exit %d\n%s", code, out)
	}

	// A move through the CLI changes where real traffic goes.
	d := cm.moveAndWatch(r1, 7, "eu-west-1")
	t.Logf("shard 7 moved: every sidecar routed to eu-west-1 %s after the CLI's answer", d)

	// SIGKILL the leader: a new one is elected, sidecars reconnect, and a
	// later move reaches every sidecar.
	old := cm.leader(cm.replicas...)
	if old == nil {
		t.Fatal("no leader")
	}
	var rest []*cpProc
	for _, r := range cm.replicas {
		if r != old {
			rest = append(rest, r)
		}
	}
	old.cmd.Process.Signal(syscall.SIGKILL)
	<-old.done
	d = cm.waitUntil("a new leader", 30*time.Second, func() bool {
		l := cm.leader(rest...)
		return l != nil && l != old
	})
	t.Logf("leader %s killed: a new leader %s after %s", old.id, cm.leader(rest...).id, d)
	cm.waitUntil("every sidecar registered through a live replica", 30*time.Second, func() bool {
		m, ok := cm.members(rest[0])
		if !ok || len(m.Endpoints) != len(cm.units) {
			return false
		}
		for _, e := range m.Endpoints {
			if e.Via == old.id {
				return false
			}
		}
		return true
	})
	d = cm.moveAndWatch(rest[1], 8, "us-east-2")
	t.Logf("shard 8 moved after the leader's loss: every sidecar routed to us-east-2 %s after the CLI's answer", d)

	// The killed replica restarts from its data directory with every
	// acknowledged change.
	cm.startReplica(old)
	cm.waitUntil("the restarted replica to hold both moves", 30*time.Second, func() bool {
		var s7, s8 struct{ Unit string }
		c7, _ := cm.api(old, "GET", "/v1/shards/7", "", &s7)
		c8, _ := cm.api(old, "GET", "/v1/shards/8", "", &s8)
		return c7 == 200 && c8 == 200 && s7.Unit == "eu-west-1" && s8.Unit == "us-east-2"
	})

	// A minority cut off: it knows no leader, refuses writes with the
	// reason, and keeps serving its last state over xDS.
	leader := cm.leader(cm.replicas...)
	var minority *cpProc
	for _, r := range cm.replicas {
		if r != leader {
			minority = r
		}
	}
	cm.cut.Store(minority.ip)
	for _, r := range cm.replicas {
		r.relay.drop(func(src string) bool { return r == minority || src == minority.ip })
	}
	cm.waitUntil("the cut-off replica to know no leader", 30*time.Second, func() bool {
		code, _ := cm.api(minority, "GET", "/readyz", "", nil)
		return code == http.StatusServiceUnavailable
	})
	code, body := cm.api(minority, "POST", "/v1/shards/9/move", `{"to":"eu-west-1"}`, nil)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "knows no raft leader") {
		t.Fatalf("a write on the cut-off replica: %d %s", code, body)
	}
	if out, code := cm.ctl(minority, "move", "9", "--to", "eu-west-1"); code != exitError || !strings.Contains(out, "HTTP 503") {
		t.Fatalf("cellmesh move on the cut-off replica: exit %d\n%s", code, out)
	}
	var s9 struct{ Unit string }
	if code, _ := cm.api(minority, "GET", "/v1/shards/9", "", &s9); code != 200 || s9.Unit != "us-east-1" {
		t.Fatalf("the cut-off replica's last state: %d %+v", code, s9)
	}
	// A sidecar that reaches only the cut-off replica still gets the map.
	extra := &meshProc{unit: "us-east-1", region: "us-east", outbound: freeTCP(t), quic: freeUDP(t), tcp: freeTCP(t), admin: freeTCP(t), app: cm.by["us-east-1"].app}
	extraCfg := filepath.Join(cm.dir, "us-east-1-extra.yaml")
	cm.writeSidecarConfig(extra, extraCfg, []string{minority.xds})
	extra.sidecarLog = filepath.Join(cm.dir, "us-east-1-extra-sidecar.log")
	extra.sidecar, extra.sidecarDone = cm.start(extra.sidecarLog, cm.bin, "sidecar", "--config", extraCfg, "--log-level", "info")
	cm.waitHTTP("http://"+extra.admin+"/readyz", extra)
	// The majority goes on.
	d = cm.moveAndWatch(leader, 10, "eu-west-2")
	t.Logf("shard 10 moved by the majority while %s was cut off: routed %s after the CLI's answer", minority.id, d)
	// Healed, the minority catches up.
	cm.cut.Store("")
	cm.waitUntil("the healed replica to catch up", 30*time.Second, func() bool {
		var s10 struct{ Unit string }
		code, _ := cm.api(minority, "GET", "/v1/shards/10", "", &s10)
		return code == 200 && s10.Unit == "eu-west-2"
	})
	extra.sidecar.Process.Signal(syscall.SIGTERM)
	<-extra.sidecarDone

	// A map a sidecar cannot apply (its unit removed) is NACKed; it keeps
	// routing on its last map, and the others take the new one.
	leader = cm.leader(cm.replicas...)
	cur, code := cm.ctl(leader, "topology", "get")
	if code != 0 {
		t.Fatalf("cellmesh topology get: exit %d\n%s", code, cur)
	}
	curPath, nextPath := filepath.Join(cm.dir, "current.yaml"), filepath.Join(cm.dir, "next.yaml")
	if err := os.WriteFile(curPath, []byte(cur), 0o600); err != nil {
		t.Fatal(err)
	}
	cm.cli("plan", "remove-unit", "--unit", "eu-west-2", "--topology", curPath, "--write-topology", nextPath)
	ew2 := cm.by["eu-west-2"]
	before := mapVersion(ew2.admin)
	if out, code := cm.ctl(leader, "topology", "apply", nextPath); code != 0 {
		t.Fatalf("cellmesh topology apply: exit %d\n%s", code, out)
	}
	next, err := topofile.Load(nextPath)
	if err != nil {
		t.Fatal(err)
	}
	cm.waitUntil("the other sidecars on the new map", 30*time.Second, func() bool {
		for _, p := range cm.units {
			if p != ew2 && mapVersion(p.admin) != next.Version {
				return false
			}
		}
		return true
	})
	cm.waitUntil("eu-west-2's NACK", 30*time.Second, func() bool {
		return metricValue(t, metricsOf(t, ew2.admin), "cellmesh_xds_updates_total", `type="shardmap"`, `result="nack"`) >= 1
	})
	nacks := 0.0
	for _, r := range cm.replicas {
		resp, err := http.Get("http://" + r.api + "/metrics")
		if err != nil {
			continue
		}
		text, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		nacks += metricValue(t, string(text), "cellmesh_xds_acks_total", `type="shardmap"`, `result="nack"`)
	}
	if nacks < 1 {
		t.Fatal("no replica counted eu-west-2's NACK")
	}
	if v := mapVersion(ew2.admin); v != before {
		t.Fatalf("eu-west-2 changed its map from %d to %d though it refused it", before, v)
	}
	m, _ := routing.Compile(next)
	for _, shard := range []int{75, 99} {
		if o, _ := m.Lookup(shard); !cm.landsAt("us-east-1", strconv.Itoa(2088000000000+shard), o.Unit) {
			t.Fatalf("shard %d does not reach its new owner %s", shard, o.Unit)
		}
	}
	// Traffic through eu-west-2's sidecar keeps flowing on its old map.
	sentBefore := tr.sent.Load()
	cm.waitUntil("more traffic", 30*time.Second, func() bool { return tr.sent.Load() > sentBefore+200 })

	sent, failed, failures := tr.end()
	tr = nil
	t.Logf("traffic: %d requests, %d failed", sent, failed)
	if failed > 0 {
		t.Fatalf("%d of %d requests failed:\n%s\n%s", failed, sent, strings.Join(failures, "\n"), cm.logs())
	}

	// Replicas stop cleanly on SIGTERM.
	for _, r := range cm.replicas {
		r.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, r := range cm.replicas {
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("replica %s after SIGTERM: %v", r.id, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("replica %s did not stop within 30s of SIGTERM", r.id)
		}
	}
}
