package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// The real binaries as separate processes: two regions x two units, an
// echo behind each sidecar, certificates made by `cellmesh certs`.

type meshProc struct {
	unit, region                    string
	outbound, quic, tcp, admin, app string
	topoPath, configPath            string
	sidecar, echo                   *exec.Cmd
	sidecarLog, echoLog             string
	sidecarDone, echoDone           chan error
}

type procMesh struct {
	t     *testing.T
	dir   string
	bin   string
	units []*meshProc
	by    map[string]*meshProc
	topo  *routing.Topology
	eps   string // the endpoints: lines of the sidecar files
	// net puts each region's processes in a network namespace of its own
	// (nil: all on loopback).
	net *regionNet
}

func buildBinaries(t *testing.T) (cellmesh, echo string) {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	for _, b := range []struct{ out, pkg string }{{"cellmesh", "."}, {"echo", "../../examples/echo/cmd/echo"}} {
		cmd := exec.CommandContext(ctx, goTool, "build", "-o", filepath.Join(dir, b.out), b.pkg)
		cmd.WaitDelay = 5 * time.Second
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	return filepath.Join(dir, "cellmesh"), filepath.Join(dir, "echo")
}

// Ports for the processes are picked below the kernel's ephemeral range
// (32768 and up on Linux): a port found free and closed again is then not
// handed to another test's ":0" listener before the process binds it, as
// it could be in the ephemeral range while packages test in parallel.
const procPortLow, procPortHigh = 20000, 32000

// handedOut holds the ports freePort gave out in this test binary: a port
// is given once, so two processes of a test never get the same one.
var handedOut sync.Map

// freePort returns a port of 127.0.0.1 below the ephemeral range that is
// free now for the network (tcp or udp).
func freePort(t *testing.T, network string) string {
	t.Helper()
	for range 1000 {
		port := procPortLow + rand.IntN(procPortHigh-procPortLow)
		if _, taken := handedOut.LoadOrStore(port, true); taken {
			continue // handed out already, maybe not bound yet
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if network == "udp" {
			pc, err := net.ListenPacket("udp", addr)
			if err == nil {
				pc.Close()
				return addr
			}
			continue
		}
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			ln.Close()
			return addr
		}
	}
	t.Fatalf("no free %s port in %d-%d", network, procPortLow, procPortHigh)
	return ""
}

func freeTCP(t *testing.T) string { t.Helper(); return freePort(t, "tcp") }

func freeUDP(t *testing.T) string { t.Helper(); return freePort(t, "udp") }

// freeGossip is a port free for both UDP and TCP (gossip binds both).
func freeGossip(t *testing.T) string {
	t.Helper()
	for range 1000 {
		addr := freeTCP(t)
		if pc, err := net.ListenPacket("udp", addr); err == nil {
			pc.Close()
			return addr
		}
	}
	t.Fatal("no port free for both UDP and TCP")
	return ""
}

// startProcMesh starts the local example's topology as processes; h2Units
// are reached over HTTP/2 on TLS.
func startProcMesh(t *testing.T, h2Units ...string) *procMesh {
	t.Helper()
	bin, echoBin := buildBinaries(t)
	pm := &procMesh{t: t, dir: t.TempDir(), bin: bin, by: map[string]*meshProc{}}
	topo, err := topofile.Load("../../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pm.topo = topo
	certs := filepath.Join(pm.dir, "certs")
	pm.cli("certs", "init", "--dir", certs, "--trust-domain", "cellmesh.test")
	for _, u := range topo.Units {
		p := &meshProc{unit: u.Name, region: u.Region, outbound: freeTCP(t), quic: freeUDP(t), tcp: freeTCP(t), admin: freeTCP(t), app: freeTCP(t)}
		p.topoPath = filepath.Join(pm.dir, u.Name+"-topology.yaml")
		p.configPath = filepath.Join(pm.dir, u.Name+".yaml")
		pm.cli("certs", "issue", "--dir", certs, "--region", u.Region, "--unit", u.Name, "--service", "echo")
		pm.units = append(pm.units, p)
		pm.by[u.Name] = p
	}
	var eps strings.Builder
	for _, p := range pm.units {
		addr, tr := p.quic, "quic"
		for _, h := range h2Units {
			if h == p.unit {
				addr, tr = p.tcp, "h2"
			}
		}
		fmt.Fprintf(&eps, "  - {service: echo, unit: %s, address: %s, transport: %s}\n", p.unit, addr, tr)
	}
	pm.eps = eps.String()
	for _, p := range pm.units {
		pm.writeTopology(p, topo)
		cfg := fmt.Sprintf(`identity: {region: %s, unit: %s, service: echo}
app: %s
listen: {outbound: %s, inbound_quic: %s, inbound_tcp: %s, admin: %s}
topology: %s
tls: {ca: certs/ca.pem, cert: certs/%s-echo.pem, key: certs/%s-echo-key.pem}
reload_interval: 1h
drain_timeout: 10s
endpoints:
%s`, p.region, p.unit, p.app, p.outbound, p.quic, p.tcp, p.admin, filepath.Base(p.topoPath), p.unit, p.unit, eps.String())
		if err := os.WriteFile(p.configPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p.echoLog = filepath.Join(pm.dir, p.unit+"-echo.log")
		p.echo, p.echoDone = pm.start(p.echoLog, echoBin, "--listen", p.app, "--unit", p.unit, "--region", p.region, "--service", "echo")
		p.sidecarLog = filepath.Join(pm.dir, p.unit+"-sidecar.log")
		p.sidecar, p.sidecarDone = pm.start(p.sidecarLog, bin, "sidecar", "--config", p.configPath, "--log-level", "debug")
	}
	for _, p := range pm.units {
		pm.waitHTTP("http://"+p.admin+"/readyz", p)
	}
	return pm
}

func (pm *procMesh) cli(args ...string) string {
	pm.t.Helper()
	ctx, cancel := context.WithTimeout(pm.t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, pm.bin, args...).CombinedOutput()
	if err != nil {
		pm.t.Fatalf("cellmesh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (pm *procMesh) writeTopology(p *meshProc, topo *routing.Topology) {
	pm.t.Helper()
	data, err := topofile.Encode(topo)
	if err != nil {
		pm.t.Fatal(err)
	}
	tmp := p.topoPath + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		pm.t.Fatal(err)
	}
	if err := os.Rename(tmp, p.topoPath); err != nil {
		pm.t.Fatal(err)
	}
}

// start runs a process with its output in logPath; the test's cleanup
// kills whatever is still running.
func (pm *procMesh) start(logPath, bin string, args ...string) (*exec.Cmd, chan error) {
	pm.t.Helper()
	return pm.startIn("", logPath, bin, args...)
}

// startIn is start for a process of region: in the region's network
// namespace when the mesh has them.
func (pm *procMesh) startIn(region, logPath, bin string, args ...string) (*exec.Cmd, chan error) {
	pm.t.Helper()
	f, err := os.Create(logPath)
	if err != nil {
		pm.t.Fatal(err)
	}
	cmd := pm.net.command(region, bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		pm.t.Fatal(err)
	}
	// done gets the exit and is then closed, so the cleanup's receive
	// returns whether or not a test took the exit first.
	done := make(chan error, 1)
	go func() { done <- cmd.Wait(); f.Close(); close(done) }()
	pm.t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
	})
	return cmd, done
}

func (pm *procMesh) waitHTTP(url string, p *meshProc) {
	pm.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(p.sidecarLog)
			pm.t.Fatalf("%s not ready after 30s: %v\nsidecar log:\n%s", url, err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// send sends a request for uid into the mesh through unit from.
func (pm *procMesh) send(method, from, uid, path string, body io.Reader) (*http.Response, []byte) {
	pm.t.Helper()
	req, err := http.NewRequest(method, "http://"+pm.by[from].outbound+path, body)
	if err != nil {
		pm.t.Fatal(err)
	}
	req.Host = "echo"
	req.Header.Set("x-cellmesh-uid", uid)
	c := &http.Client{Timeout: 2 * time.Minute}
	resp, err := c.Do(req)
	if err != nil {
		pm.t.Fatalf("%s %s from %s: %v", method, path, from, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		pm.t.Fatal(err)
	}
	return resp, data
}

type echoAnswer struct {
	Unit       string      `json:"unit"`
	Region     string      `json:"region"`
	Headers    http.Header `json:"headers"`
	BodyBytes  int64       `json:"body_bytes"`
	BodySHA256 string      `json:"body_sha256"`
}

func home(pm *procMesh, uid string) string {
	m, err := routing.Compile(pm.topo)
	if err != nil {
		pm.t.Fatal(err)
	}
	shard, err := m.ShardOf(uid)
	if err != nil {
		pm.t.Fatal(err)
	}
	o, _ := m.Lookup(shard)
	return o.Unit
}

// vmHWM is a process's peak resident set in bytes (/proc/PID/status).
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// patternReader yields n bytes of a fixed pattern without holding them.
type patternReader struct{ n, off int64 }

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n-r.off {
		p = p[:r.n-r.off]
	}
	for i := range p {
		p[i] = byte((r.off + int64(i)) % 251)
	}
	r.off += int64(len(p))
	return len(p), nil
}

func TestProcessMesh(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 8 processes; skipped under -short")
	}
	pm := startProcMesh(t, "eu-west-2")

	t.Run("each user reaches its home unit", func(t *testing.T) {
		for _, from := range pm.units {
			for _, uid := range []string{"2088123456789", "2088000000012", "2088000000031", "2088000000057", "2088000000075", "5", "99"} {
				resp, body := pm.send("GET", from.unit, uid, "/v1/users/"+uid, nil)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("uid %s from %s: %d %s", uid, from.unit, resp.StatusCode, body)
				}
				var a echoAnswer
				if err := json.Unmarshal(body, &a); err != nil {
					t.Fatal(err)
				}
				if want := home(pm, uid); a.Unit != want {
					t.Errorf("uid %s from %s answered by %s, want %s", uid, from.unit, a.Unit, want)
				}
			}
		}
	})

	t.Run("garbage on every port crashes nothing", func(t *testing.T) {
		p := pm.by["us-east-2"]
		junk := make([]byte, 4096)
		for i := range junk {
			junk[i] = byte(i*7919 + i/13)
		}
		for _, a := range []string{p.outbound, p.admin, p.tcp} {
			c, err := net.DialTimeout("tcp", a, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write(junk)
			c.Write([]byte("GET /" + strings.Repeat("x", 100<<10) + " HTTP/1.1\r\n\r\n"))
			io.Copy(io.Discard, c)
			c.Close()
		}
		u, err := net.Dial("udp", p.quic)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 50 {
			junk[0] = byte(0xc0 | i)
			u.Write(junk[:1200])
		}
		u.Close()
		for _, uid := range []string{"2088000000031", "2088000000057"} {
			resp, body := pm.send("GET", "us-east-2", uid, "/", nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("after garbage: %d %s", resp.StatusCode, body)
			}
		}
		resp, body := pm.send("GET", "eu-west-1", "2088000000031", "/", nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("into us-east-2 after garbage: %d %s", resp.StatusCode, body)
		}
		select {
		case err := <-p.sidecarDone:
			t.Fatalf("the sidecar exited: %v", err)
		default:
		}
	})

	t.Run("a sidecar with a certificate from another CA is refused", func(t *testing.T) {
		foreign := filepath.Join(pm.dir, "foreign")
		pm.cli("certs", "init", "--dir", foreign, "--trust-domain", "cellmesh.test")
		pm.cli("certs", "issue", "--dir", foreign, "--region", "us-east", "--unit", "us-east-1", "--service", "batch")
		// It trusts the mesh CA too, so that only the mesh's side refuses.
		var bundle []byte
		for _, f := range []string{filepath.Join(foreign, "ca.pem"), filepath.Join(pm.dir, "certs", "ca.pem")} {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			bundle = append(bundle, b...)
		}
		if err := os.WriteFile(filepath.Join(foreign, "bundle.pem"), bundle, 0o600); err != nil {
			t.Fatal(err)
		}
		outbound, admin := freeTCP(t), freeTCP(t)
		cfg := fmt.Sprintf(`identity: {region: us-east, unit: us-east-1, service: batch}
app: %s
listen: {outbound: %s, inbound_quic: %s, admin: %s}
topology: %s
tls: {ca: foreign/bundle.pem, cert: foreign/us-east-1-batch.pem, key: foreign/us-east-1-batch-key.pem}
endpoints:
%s`, freeTCP(t), outbound, freeUDP(t), admin, filepath.Base(pm.by["us-east-1"].topoPath), pm.eps)
		path := filepath.Join(pm.dir, "foreign.yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		f := &meshProc{unit: "foreign", sidecarLog: filepath.Join(pm.dir, "foreign-sidecar.log")}
		f.sidecar, f.sidecarDone = pm.start(f.sidecarLog, pm.bin, "sidecar", "--config", path)
		pm.waitHTTP("http://"+admin+"/readyz", f)
		req, _ := http.NewRequest("GET", "http://"+outbound+"/", nil)
		req.Host = "echo"
		req.Header.Set("x-cellmesh-uid", "2088000000057") // eu-west-1, over QUIC
		resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("x-cellmesh-error") != "unreachable" {
			t.Fatalf("foreign sidecar: %d %q %s, want 503 unreachable", resp.StatusCode, resp.Header.Get("x-cellmesh-error"), body)
		}
		target := pm.by["eu-west-1"]
		deadline := time.Now().Add(10 * time.Second)
		for {
			log, _ := os.ReadFile(target.sidecarLog)
			if strings.Contains(string(log), "peer certificate refused") && strings.Contains(string(log), "reason=unknown-ca") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("eu-west-1 did not log the refusal with its reason:\n%s", log)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(metricsOf(t, target.admin), `cellmesh_tls_rejected_total{direction="inbound",reason="unknown-ca"}`) {
			t.Error("eu-west-1 did not count the refusal")
		}
	})

	t.Run("1 GiB upload streams with bounded memory", func(t *testing.T) {
		const size = 1 << 30
		uid := "2088000000057" // shard 57: eu-west-1, over QUIC from us-east-1
		h := sha256.New()
		if _, err := io.Copy(h, &patternReader{n: size}); err != nil {
			t.Fatal(err)
		}
		want := hex.EncodeToString(h.Sum(nil))
		resp, body := pm.send("POST", "us-east-1", uid, "/upload", &patternReader{n: size})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		var a echoAnswer
		if err := json.Unmarshal(body, &a); err != nil {
			t.Fatal(err)
		}
		if a.Unit != "eu-west-1" || a.BodyBytes != size || a.BodySHA256 != want {
			t.Fatalf("echo in %s got %d bytes sha %s, want eu-west-1, %d bytes, sha %s", a.Unit, a.BodyBytes, a.BodySHA256, size, want)
		}
		for _, u := range []string{"us-east-1", "eu-west-1"} {
			hwm := vmHWM(t, pm.by[u].sidecar.Process.Pid)
			t.Logf("sidecar %s peak RSS after a 1 GiB upload: %.1f MiB", u, float64(hwm)/(1<<20))
			if hwm > 160<<20 {
				t.Errorf("sidecar %s peak RSS %.1f MiB: the body was not streamed with bounded memory", u, float64(hwm)/(1<<20))
			}
		}
	})

	t.Run("stale epoch is fenced after a reload", func(t *testing.T) {
		moved := pm.topo.Clone()
		moved.Version = 2
		for i, a := range moved.Assignments {
			if a.Shard == 7 {
				moved.Assignments[i].Primary, moved.Assignments[i].Epoch, moved.Assignments[i].Standbys = "eu-west-1", 2, []string{"us-east-1"}
			}
		}
		for _, u := range []string{"us-east-1", "eu-west-1"} {
			p := pm.by[u]
			pm.writeTopology(p, moved)
			if err := p.sidecar.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(20 * time.Second)
			for {
				var st struct {
					MapVersion uint64 `json:"map_version"`
				}
				resp, err := http.Get("http://" + p.admin + "/config")
				if err == nil {
					json.NewDecoder(resp.Body).Decode(&st)
					resp.Body.Close()
				}
				if st.MapVersion == 2 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s did not load map version 2 after SIGHUP", u)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		resp, body := pm.send("GET", "us-east-2", "2088000000007", "/", nil)
		if resp.StatusCode != http.StatusMisdirectedRequest || resp.Header.Get("x-cellmesh-owner") != "eu-west-1" || resp.Header.Get("x-cellmesh-epoch") != "2" {
			t.Fatalf("stale sender: %d owner %q epoch %q, want 421 eu-west-1 2: %s", resp.StatusCode,
				resp.Header.Get("x-cellmesh-owner"), resp.Header.Get("x-cellmesh-epoch"), body)
		}
		resp, body = pm.send("GET", "us-east-1", "2088000000007", "/", nil)
		var a echoAnswer
		if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &a) != nil || a.Unit != "eu-west-1" {
			t.Fatalf("updated sender: %d %s, want 200 from eu-west-1", resp.StatusCode, body)
		}
	})

	t.Run("destination app down answers 503 at once", func(t *testing.T) {
		p := pm.by["us-east-2"]
		p.echo.Process.Signal(syscall.SIGKILL)
		<-p.echoDone
		start := time.Now()
		resp, body := pm.send("GET", "eu-west-1", "2088000000031", "/", nil)
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "refused the connection") {
			t.Fatalf("app down: %d %s, want 503 naming the refused connection", resp.StatusCode, body)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("the 503 took %s: it should not wait for a timeout", d)
		}
	})

	t.Run("SIGTERM drains and exits 0", func(t *testing.T) {
		p := pm.by["eu-west-1"]
		type res struct {
			code int
			err  error
		}
		inflight := make(chan res, 1)
		go func() {
			req, _ := http.NewRequest("GET", "http://"+pm.by["us-east-1"].outbound+"/delay?ms=1500", nil)
			req.Host = "echo"
			req.Header.Set("x-cellmesh-uid", "2088000000057")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				inflight <- res{err: err}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			inflight <- res{code: resp.StatusCode}
		}()
		// Wait until the request is in eu-west-1's inbound listener.
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(metricsOf(t, p.admin), `cellmesh_requests_in_flight{direction="inbound"} 1`) {
			if time.Now().After(deadline) {
				t.Fatal("the slow request never reached eu-west-1")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := p.sidecar.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-p.sidecarDone:
			if err != nil {
				log, _ := os.ReadFile(p.sidecarLog)
				t.Fatalf("sidecar exit: %v\n%s", err, log)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("sidecar did not exit within 30s of SIGTERM")
		}
		r := <-inflight
		if r.err != nil || r.code != http.StatusOK {
			t.Fatalf("the in-flight request: %d %v, want 200: draining must let it finish", r.code, r.err)
		}
		log, _ := os.ReadFile(p.sidecarLog)
		if !strings.Contains(string(log), "drained") {
			t.Errorf("sidecar log does not report the drain:\n%s", log)
		}
	})
}

func metricsOf(t *testing.T, admin string) string {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
