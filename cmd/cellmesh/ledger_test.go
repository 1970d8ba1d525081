package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// ledgerUnit is one unit of the proof: the ledger and its sidecar.
type ledgerUnit struct {
	*meshProc
	ledger     *exec.Cmd
	ledgerDone chan error
	ledgerLog  string
	dead       bool
}

type ledgerMesh struct {
	*cpMesh
	ledgerBin string
	lunits    map[string]*ledgerUnit
	order     []string
}

func buildLedger(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ledger")
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "../../examples/ledger/cmd/ledger")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ledger: %v\n%s", err, b)
	}
	return out
}

// startLedgerMesh starts the ledger topology (3 regions x 2 units) as
// processes: three control-plane replicas (one per region) with gossip and
// the ledger as handoff service, and in every unit a ledger behind a
// sidecar on xDS and gossip. With rn, each region's processes run in the
// region's network namespace; without, all on loopback.
func startLedgerMesh(t *testing.T, rn *regionNet) *ledgerMesh {
	t.Helper()
	bin, _ := buildBinaries(t)
	lm := &ledgerMesh{cpMesh: &cpMesh{procMesh: &procMesh{t: t, dir: t.TempDir(), bin: bin, by: map[string]*meshProc{}, net: rn}}, ledgerBin: buildLedger(t), lunits: map[string]*ledgerUnit{}}
	cm := lm.cpMesh
	cm.cut.Store("")
	cm.certs = filepath.Join(cm.dir, "certs")
	cm.cli("certs", "init", "--dir", cm.certs, "--trust-domain", "cellmesh.test")
	cm.gossipKey = filepath.Join(cm.dir, "gossip.key")
	if err := os.WriteFile(cm.gossipKey, []byte(cm.cli("gossip-key")), 0o600); err != nil {
		t.Fatal(err)
	}
	topo, err := filepath.Abs("../../examples/ledger/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for i, region := range []string{"us", "eu", "ap"} {
		id := "cp-" + region
		r := &cpProc{id: id, region: region, api: rn.addr(t, region, "tcp"), xds: rn.addr(t, region, "tcp"), log: filepath.Join(cm.dir, id+".log"), dataDir: filepath.Join(cm.dir, id)}
		cm.cli("certs", "issue", "--dir", cm.certs, "--region", region, "--unit", id, "--service", "cellmesh-controlplane")
		name := id + "-cellmesh-controlplane"
		g := rn.addr(t, region, "gossip")
		cm.gossipSeeds = append(cm.gossipSeeds, g)
		r.args = []string{"controlplane", "--id", id, "--region", region, "--data-dir", r.dataDir,
			"--raft", rn.addr(t, region, "tcp"), "--api", r.api, "--xds", r.xds,
			"--tls-ca", filepath.Join(cm.certs, "ca.pem"), "--tls-cert", filepath.Join(cm.certs, name+".pem"),
			"--tls-key", filepath.Join(cm.certs, name+"-key.pem"), "--log-level", "debug",
			"--gossip", g, "--gossip-profile", "fast", "--gossip-key-file", cm.gossipKey, "--handoff-service", "ledger"}
		if i == 0 {
			r.args = append(r.args, "--topology", topo)
		} else {
			r.args = append(r.args, "--join", cm.replicas[0].api, "--gossip-join", cm.gossipSeeds[0])
		}
		cm.replicas = append(cm.replicas, r)
	}
	for _, r := range cm.replicas {
		cm.startReplica(r)
	}
	cm.waitUntil("three voters, one leader", 60*time.Second, func() bool {
		m, ok := cm.members(cm.replicas[0])
		return ok && m.Leader != "" && len(m.Replicas) == 3
	})
	var servers []string
	for _, r := range cm.replicas {
		servers = append(servers, r.xds)
	}
	for _, pair := range []string{"us-1:us", "us-2:us", "eu-1:eu", "eu-2:eu", "ap-1:ap", "ap-2:ap"} {
		unit, region, _ := strings.Cut(pair, ":")
		p := &meshProc{unit: unit, region: region, outbound: rn.addr(t, region, "tcp"), quic: rn.addr(t, region, "udp"),
			tcp: rn.addr(t, region, "tcp"), admin: rn.addr(t, region, "tcp"), app: rn.addr(t, region, "tcp")}
		cm.cli("certs", "issue", "--dir", cm.certs, "--region", region, "--unit", unit, "--service", "ledger")
		p.configPath = filepath.Join(cm.dir, unit+".yaml")
		cm.writeServiceSidecarConfig(p, p.configPath, "ledger", servers)
		u := &ledgerUnit{meshProc: p, ledgerLog: filepath.Join(cm.dir, unit+"-ledger.log")}
		u.ledger, u.ledgerDone = cm.startIn(region, u.ledgerLog, lm.ledgerBin, "--unit", unit, "--region", region, "--listen", p.app,
			"--data-dir", filepath.Join(cm.dir, unit+"-data"), "--mesh", p.outbound, "--sidecar-admin", p.admin)
		p.sidecarLog = filepath.Join(cm.dir, unit+"-sidecar.log")
		p.sidecar, p.sidecarDone = cm.startIn(region, p.sidecarLog, bin, "sidecar", "--config", p.configPath, "--log-level", "info")
		cm.units = append(cm.units, p)
		cm.by[unit] = p
		lm.lunits[unit] = u
		lm.order = append(lm.order, unit)
	}
	for _, p := range cm.units {
		cm.waitHTTP("http://"+p.admin+"/readyz", p)
	}
	cm.waitUntil("every unit up with a lease", 60*time.Second, func() bool {
		for _, p := range cm.units {
			if metricValue(t, metricsOf(t, p.admin), "cellmesh_lease_remaining_seconds") <= 0 {
				return false
			}
		}
		g := cm.gossipView(cm.leader(cm.replicas...))
		for _, p := range cm.units {
			if g.unit(p.unit) != "up" {
				return false
			}
		}
		return true
	})
	return lm
}

// kill SIGKILLs a unit's sidecar and ledger.
func (lm *ledgerMesh) kill(unit string) {
	u := lm.lunits[unit]
	u.sidecar.Process.Signal(syscall.SIGKILL)
	u.ledger.Process.Signal(syscall.SIGKILL)
	<-u.sidecarDone
	<-u.ledgerDone
	u.dead = true
}

// shards reads the shard map from a live replica.
func (lm *ledgerMesh) shards() map[int]struct {
	Unit  string
	Epoch uint64
	State string
} {
	return lm.shardsFrom(lm.replicas...)
}

// shardsFrom reads the shard map from the first of replicas that answers.
func (lm *ledgerMesh) shardsFrom(replicas ...*cpProc) map[int]struct {
	Unit  string
	Epoch uint64
	State string
} {
	var out struct {
		Shards []struct {
			Shard int
			Unit  string
			Epoch uint64
			State string
		}
	}
	for _, r := range replicas {
		if code, _ := lm.api(r, "GET", "/v1/shards", "", &out); code == 200 {
			break
		}
	}
	m := map[int]struct {
		Unit  string
		Epoch uint64
		State string
	}{}
	for _, s := range out.Shards {
		m[s.Shard] = struct {
			Unit  string
			Epoch uint64
			State string
		}{s.Unit, s.Epoch, s.State}
	}
	return m
}

func (lm *ledgerMesh) liveReplicas() []*cpProc {
	var out []*cpProc
	for _, r := range lm.replicas {
		select {
		case <-r.done:
		default:
			out = append(out, r)
		}
	}
	return out
}

// checkLeaseWait checks I3 on the record, as replica r has it: every
// unplanned handoff away from unit committed only after the unit's last
// lease had ended, plus the sidecars' skew margin, on the leader's clock.
// It returns when the first of them started.
func (lm *ledgerMesh) checkLeaseWait(t *testing.T, r *cpProc, unit string) time.Time {
	t.Helper()
	var hs struct {
		Handoffs []struct {
			Shard      int
			Kind, From string
			Phase      string
			Started    time.Time
		}
	}
	var mem struct {
		Leases []struct {
			Unit   string
			EndsAt time.Time `json:"ends_at"`
		}
	}
	lm.api(r, "GET", "/v1/handoffs", "", &hs)
	lm.api(r, "GET", "/v1/members", "", &mem)
	var ends time.Time
	for _, l := range mem.Leases {
		if l.Unit == unit {
			ends = l.EndsAt
		}
	}
	var first time.Time
	for _, h := range hs.Handoffs {
		if h.Kind != "unplanned" || h.From != unit || h.Phase != "done" {
			continue
		}
		if ends.IsZero() || h.Started.Before(ends.Add(500*time.Millisecond)) {
			t.Fatalf("I3: shard %d left %s at %s, before its lease ended (%s) plus the margin", h.Shard, unit, h.Started.Format(time.RFC3339Nano), ends.Format(time.RFC3339Nano))
		}
		if first.IsZero() || h.Started.Before(first) {
			first = h.Started
		}
	}
	if first.IsZero() {
		t.Fatalf("no unplanned handoff recorded away from %s", unit)
	}
	return first
}

// An operation of the history, by account.
type acctInput struct {
	Kind   string // deposit, debit, credit, read
	Amount int64
	// Unknown: the answer was not seen (a credit, done by the ledger for
	// a transfer; or an operation that never got an answer).
	Unknown bool
}

type acctOutput struct {
	OK      bool
	Balance int64
}

var accountModel = porcupine.Model{
	Init: func() any { return int64(0) },
	Step: func(state, input, output any) (bool, any) {
		s, in, out := state.(int64), input.(acctInput), output.(acctOutput)
		switch in.Kind {
		case "read":
			return in.Unknown || out.Balance == s, s
		case "deposit", "credit":
			return in.Unknown || out.Balance == s+in.Amount, s + in.Amount
		case "debit":
			if s >= in.Amount {
				return in.Unknown || (out.OK && out.Balance == s-in.Amount), s - in.Amount
			}
			return in.Unknown || (!out.OK && out.Balance == s), s
		}
		return false, s
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(acctInput), output.(acctOutput)
		return fmt.Sprintf("%s %d -> %v %d (unknown %v)", in.Kind, in.Amount, out.OK, out.Balance, in.Unknown)
	},
}

// history records the operations of the clients, per account. A write in
// flight is in the history as one that may or may not have happened (no
// answer yet): a check while clients run sees it so.
type history struct {
	mu       sync.Mutex
	ops      map[string][]porcupine.Operation
	inflight map[int64][]acctOp
	next     int64
	acked    atomic.Int64 // writes acknowledged
	attempts atomic.Int64
	errors   atomic.Int64 // attempts that failed (client-visible errors)
	pending  atomic.Int64 // writes never acknowledged
	stale    atomic.Int64 // reads answered marked x-cellmesh-stale: not in the history
	kinds    sync.Map     // error kind -> *atomic.Int64
	samples  sync.Map     // error kind -> what the last one said
}

func (h *history) failed(kind, said string) {
	h.errors.Add(1)
	n, _ := h.kinds.LoadOrStore(kind, new(atomic.Int64))
	n.(*atomic.Int64).Add(1)
	if len(said) > 160 {
		said = said[:160] + "..."
	}
	h.samples.Store(kind, strings.TrimSpace(said))
}

// errorKinds says how many attempts failed, by kind, and resets the count.
func (h *history) errorKinds() string {
	var parts []string
	h.kinds.Range(func(k, v any) bool {
		if n := v.(*atomic.Int64).Swap(0); n > 0 {
			said, _ := h.samples.Load(k)
			parts = append(parts, fmt.Sprintf("%s x%d [%s]", k, n, said))
		}
		return true
	})
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// acctOp is an operation on an account.
type acctOp struct {
	acct string
	op   porcupine.Operation
}

func (h *history) add(acct string, op porcupine.Operation) {
	h.mu.Lock()
	h.ops[acct] = append(h.ops[acct], op)
	h.mu.Unlock()
}

// begin records writes in flight; complete replaces them with what came
// of them, at once.
func (h *history) begin(ops ...acctOp) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inflight == nil {
		h.inflight = map[int64][]acctOp{}
	}
	h.next++
	h.inflight[h.next] = ops
	return h.next
}

func (h *history) complete(id int64, ops ...acctOp) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.inflight, id)
	for _, o := range ops {
		h.ops[o.acct] = append(h.ops[o.acct], o.op)
	}
}

// snapshot is the history now, writes in flight as never answered. The
// caller holds h.mu.
func (h *history) snapshot() map[string][]porcupine.Operation {
	out := map[string][]porcupine.Operation{}
	for a, ops := range h.ops {
		out[a] = slices.Clone(ops)
	}
	for _, ops := range h.inflight {
		for _, o := range ops {
			op := o.op
			in := op.Input.(acctInput)
			in.Unknown = true
			op.Input, op.Output, op.Return = in, acctOutput{}, math.MaxInt64
			out[o.acct] = append(out[o.acct], op)
		}
	}
	return out
}

// client sends operations through one unit's sidecar until stop.
type ledgerClient struct {
	id       int
	readOnly bool // reads only, every other one linearizable
	outbound string
	h        *history
	accounts []string
	http     *http.Client
	start    time.Time
}

func (c *ledgerClient) now() int64 { return int64(time.Since(c.start)) }

// staleMark is the key under which do puts an answer's x-cellmesh-stale.
const staleMark = "x-cellmesh-stale"

// do sends one request, with the header pairs hdr, retrying the same
// idempotency key on errors for up to retryFor; it returns the answer
// (with staleMark set when the sidecar marked it stale), or false when
// none came.
func (c *ledgerClient) do(method, path, uid, key string, body any, retryFor time.Duration, hdr ...string) (map[string]any, bool) {
	deadline := time.Now().Add(retryFor)
	for {
		c.h.attempts.Add(1)
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, "http://"+c.outbound+path, rd)
		req.Host = "ledger"
		req.Header.Set("x-cellmesh-uid", uid)
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.http.Do(req)
		if err == nil {
			var out map[string]any
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && json.Unmarshal(raw, &out) == nil {
				if st := resp.Header.Get("x-cellmesh-stale"); st != "" {
					out[staleMark] = st
				}
				return out, true
			}
			kind := resp.Header.Get("x-cellmesh-error")
			if kind == "" {
				kind = "ledger"
			}
			c.h.failed(fmt.Sprintf("%s %d %s", method, resp.StatusCode, kind), string(raw))
		} else {
			c.h.failed(method+" transport", err.Error())
		}
		if time.Now().After(deadline) {
			return nil, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *ledgerClient) run(stop <-chan struct{}, seq *atomic.Int64) {
	r := rand.New(rand.NewPCG(uint64(c.id), 7))
	for {
		select {
		case <-stop:
			return
		default:
		}
		a := c.accounts[r.IntN(len(c.accounts))]
		call := c.now()
		key := fmt.Sprintf("c%d-%d", c.id, seq.Add(1))
		n := r.IntN(10)
		if c.readOnly {
			n %= 4
		}
		switch {
		case n < 4: // read: only answered reads are history
			// Half of them ask to be linearizable: without a lease they
			// are refused. The others are served, marked stale: they may
			// be, by design, so they are left out of the history.
			var hdr []string
			if n < 2 {
				hdr = []string{"x-cellmesh-consistency", "linearizable"}
			}
			c.read(a, call, 0, hdr...)
		case n < 7:
			amt := int64(1 + r.IntN(10))
			in := acctInput{Kind: "deposit", Amount: amt}
			id := c.h.begin(acctOp{a, porcupine.Operation{ClientId: c.id, Call: call, Input: in}})
			out, ok := c.do("POST", "/accounts/"+a+"/deposit", a, key, map[string]any{"amount": amt}, 15*time.Second)
			c.h.complete(id, c.result(a, call, in, out, ok))
		default:
			to := c.accounts[r.IntN(len(c.accounts))]
			if to == a {
				continue
			}
			amt := int64(1 + r.IntN(20))
			debit, credit := acctInput{Kind: "debit", Amount: amt}, acctInput{Kind: "credit", Amount: amt, Unknown: true}
			id := c.h.begin(acctOp{a, porcupine.Operation{ClientId: c.id, Call: call, Input: debit}}, acctOp{to, porcupine.Operation{ClientId: c.id, Call: call, Input: credit}})
			out, ok := c.do("POST", "/accounts/"+a+"/transfer", a, key, map[string]any{"to": to, "amount": amt}, 15*time.Second)
			done := []acctOp{c.result(a, call, debit, out, ok)}
			// The credit happened within the transfer when it succeeded
			// and was not refused; unknown otherwise.
			if !ok || out["ok"].(bool) {
				ret := c.now()
				if !ok {
					ret = math.MaxInt64
				}
				done = append(done, acctOp{to, porcupine.Operation{ClientId: c.id, Call: call, Return: ret, Input: credit, Output: acctOutput{}}})
			}
			c.h.complete(id, done...)
		}
	}
}

// read reads account a (retrying for up to retryFor) and records the
// answer, unless it came marked stale.
func (c *ledgerClient) read(a string, call int64, retryFor time.Duration, hdr ...string) bool {
	out, ok := c.do("GET", "/accounts/"+a, a, "", nil, retryFor, hdr...)
	switch {
	case !ok:
		return false
	case out[staleMark] != nil && len(hdr) == 0:
		c.h.stale.Add(1)
		return false
	}
	// (A linearizable read is history, marked or not.)
	c.h.add(a, porcupine.Operation{ClientId: c.id, Call: call, Return: c.now(), Input: acctInput{Kind: "read"}, Output: acctOutput{OK: true, Balance: int64(out["balance"].(float64))}})
	return true
}

// result is what came of a write: never answered, or its answer.
func (c *ledgerClient) result(acct string, call int64, in acctInput, out map[string]any, ok bool) acctOp {
	if !ok {
		c.h.pending.Add(1)
		in.Unknown = true
		return acctOp{acct, porcupine.Operation{ClientId: c.id, Call: call, Return: math.MaxInt64, Input: in, Output: acctOutput{}}}
	}
	c.h.acked.Add(1)
	return acctOp{acct, porcupine.Operation{ClientId: c.id, Call: call, Return: c.now(), Input: in, Output: acctOutput{OK: out["ok"].(bool), Balance: int64(out["balance"].(float64))}}}
}

// record adds a write that was not in flight for others to see.
func (c *ledgerClient) record(acct string, call int64, in acctInput, out map[string]any, ok bool) {
	o := c.result(acct, call, in, out, ok)
	c.h.add(o.acct, o.op)
}

// proof runs clients over a ledger mesh, records their history and
// checks it.
type proof struct {
	t        *testing.T
	lm       *ledgerMesh
	h        *history
	accounts []string
	start    time.Time
	seq      atomic.Int64
	stops    []chan struct{}
	wg       sync.WaitGroup
	unitOf   map[int]string // client id -> the unit it sends through
	clients  int            // client ids handed out
}

func newProof(t *testing.T, lm *ledgerMesh) *proof {
	p := &proof{t: t, lm: lm, h: &history{ops: map[string][]porcupine.Operation{}}, start: time.Now(), unitOf: map[int]string{}}
	for s := 0; s < 60; s += 2 {
		p.accounts = append(p.accounts, strconv.Itoa(2088000000000+s)) // shard s
	}
	t.Cleanup(p.stopClients)
	return p
}

// startClients starts a client in each of units.
func (p *proof) startClients(units []string) { p.start1(units, false) }

// startReaders starts a client that only reads in each of units.
func (p *proof) startReaders(units []string) { p.start1(units, true) }

func (p *proof) start1(units []string, readOnly bool) {
	for _, u := range units {
		stop := make(chan struct{})
		p.stops = append(p.stops, stop)
		p.clients++
		c := &ledgerClient{id: p.clients, readOnly: readOnly, outbound: p.lm.lunits[u].outbound, h: p.h, accounts: p.accounts, start: p.start,
			http: &http.Client{Timeout: 5 * time.Second}}
		p.unitOf[c.id] = u
		p.wg.Add(1)
		go func() { defer p.wg.Done(); c.run(stop, &p.seq) }()
	}
}

func (p *proof) stopClients() {
	for _, s := range p.stops {
		close(s)
	}
	p.wg.Wait()
	p.stops = nil
}

// check fails the test unless every account's history so far is
// linearizable (writes in flight count as unanswered).
func (p *proof) check(scenario string) {
	t, h := p.t, p.h
	t.Helper()
	h.mu.Lock()
	snap := h.snapshot()
	h.mu.Unlock()
	for acct, ops := range snap {
		res, info := porcupine.CheckOperationsVerbose(accountModel, ops, 30*time.Second)
		if res == porcupine.Illegal {
			path := filepath.Join(t.TempDir(), "history-"+acct+".html")
			if f, err := os.Create(path); err == nil {
				_ = porcupine.Visualize(accountModel, info, f)
				f.Close()
			}
			sorted := slices.Clone(ops)
			slices.SortFunc(sorted, func(a, b porcupine.Operation) int { return int(a.Call - b.Call) })
			var lines []string
			for _, op := range sorted {
				ret := "never"
				if op.Return != math.MaxInt64 {
					ret = time.Duration(op.Return).String()
				}
				lines = append(lines, fmt.Sprintf("  client %d (%s) %s..%s %s", op.ClientId, p.unitOf[op.ClientId], time.Duration(op.Call), ret, accountModel.DescribeOperation(op.Input, op.Output)))
			}
			t.Fatalf("%s: account %s's history (%d operations) is not linearizable: an acknowledged write is lost or a read saw what never was; see %s\n%s\n%s",
				scenario, acct, len(ops), path, strings.Join(lines, "\n"), p.lm.logs())
		}
		if res == porcupine.Unknown {
			t.Logf("%s: account %s's history could not be checked in 30s", scenario, acct)
		}
	}
	t.Logf("%s: linearizable; %d writes acknowledged, %d never answered, %d reads marked stale, %d of %d attempts failed (%s)", scenario, h.acked.Load(), h.pending.Load(), h.stale.Load(), h.errors.Load(), h.attempts.Load(), h.errorKinds())
}

// movedOff waits until no shard has its primary on one of units, as the
// first of replicas that answers says; it returns how long that took.
func (p *proof) movedOff(what string, replicas []*cpProc, units ...string) time.Duration {
	t0 := time.Now()
	p.lm.waitUntil(what, 60*time.Second, func() bool {
		for _, s := range p.lm.shardsFrom(replicas...) {
			if slices.Contains(units, s.Unit) {
				return false
			}
		}
		return true
	})
	return time.Since(t0)
}

// detected is how long after after a live replica's event log has unit
// down; -1 when none has.
func (p *proof) detected(unit string, after time.Time) time.Duration {
	var ev struct {
		Events []struct {
			Kind, Name, To string
			At             time.Time
		}
	}
	for _, r := range p.lm.liveReplicas() {
		if code, _ := p.lm.api(r, "GET", "/v1/events", "", &ev); code == 200 {
			for _, e := range ev.Events {
				if e.Kind == "unit" && e.Name == unit && e.To == "down" && e.At.After(after) {
					return e.At.Sub(after)
				}
			}
		}
	}
	return -1
}

// writesAcked waits until n more writes are acknowledged.
func (p *proof) writesAcked(what string, n int64) {
	acked0, t0 := p.h.acked.Load(), time.Now()
	p.lm.waitUntil(what, 30*time.Second, func() bool { return p.h.acked.Load() >= acked0+n })
	p.t.Logf("%s: %d writes acknowledged in %s", what, n, time.Since(t0).Round(time.Millisecond))
}

// The proof: real processes, concurrent clients with recorded call and
// return times; a unit SIGKILLed mid-run, then a whole region; then a
// standby made to lag, whose handoff must block. After each scenario every
// account's history must be linearizable (every acknowledged write
// present), and the test prints detection time, handoff time and client
// errors. The partition of a region is TestLedgerPartition.
func TestLedgerProof(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 15 processes")
	}
	lm := startLedgerMesh(t, nil)
	p := newProof(t, lm)
	h, accounts, start := p.h, p.accounts, p.start
	all := lm.replicas
	p.startClients(lm.order)
	lm.waitUntil("load", 30*time.Second, func() bool { return h.acked.Load() > 100 })
	p.check("warm-up")

	// Scenario 1: a unit lost. Its own client goes with it: the errors
	// counted are those of the clients in the units that live on.
	p.stopClients()
	p.startClients([]string{"us-2", "eu-1", "eu-2", "ap-1", "ap-2"})
	h.errorKinds()
	errs0 := h.errors.Load()
	killed := time.Now()
	lm.kill("us-1")
	p.movedOff("us-1's shards failed over", all, "us-1")
	t.Logf("unit us-1 SIGKILLed: detected after %s, every shard failed over %s after the kill, %d failed attempts by the clients of the other units so far", p.detected("us-1", killed), time.Since(killed).Round(time.Millisecond), h.errors.Load()-errs0)
	lm.checkLeaseWait(t, lm.liveReplicas()[0], "us-1")
	p.writesAcked("after us-1's failover", 100)
	p.check("unit us-1 lost")

	// Scenario 2: a region lost (its units and its control-plane replica).
	p.stopClients()
	p.startClients([]string{"us-2", "ap-1", "ap-2"})
	h.errorKinds()
	errs0 = h.errors.Load()
	killed = time.Now()
	for _, r := range lm.replicas {
		if r.region == "eu" {
			r.cmd.Process.Signal(syscall.SIGKILL)
			<-r.done
		}
	}
	lm.kill("eu-1")
	lm.kill("eu-2")
	p.movedOff("eu's shards failed over", all, "us-1", "eu-1", "eu-2")
	t.Logf("region eu SIGKILLed: eu-1 detected after %s, eu-2 after %s, every shard failed over %s after the kill, %d failed attempts by the clients of the other regions so far",
		p.detected("eu-1", killed), p.detected("eu-2", killed), time.Since(killed).Round(time.Millisecond), h.errors.Load()-errs0)
	lm.checkLeaseWait(t, lm.liveReplicas()[0], "eu-1")
	lm.checkLeaseWait(t, lm.liveReplicas()[0], "eu-2")
	p.writesAcked("after the region's failover", 100)
	p.check("region eu lost")
	p.stopClients()

	// Scenario 3: a standby made to lag: the handoff to it is blocked and
	// nothing moves.
	var shard int
	var owner, standby string
	var cur struct {
		Shard    int
		Unit     string
		Epoch    uint64
		Standbys []string
	}
	live := lm.liveReplicas()
	for s := 0; s < 60; s += 2 {
		if code, _ := lm.api(live[0], "GET", "/v1/shards/"+strconv.Itoa(s), "", &cur); code == 200 && len(cur.Standbys) > 0 && !lm.lunits[cur.Standbys[0]].dead {
			shard, owner, standby = s, cur.Unit, cur.Standbys[0]
			break
		}
	}
	if standby == "" {
		t.Fatal("no shard with a live standby left")
	}
	post := func(addr, path string) {
		resp, err := http.Post("http://"+addr+path, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	post(lm.lunits[standby].app, "/debug/apply-delay?delay=1h")
	uid := strconv.Itoa(2088000000000 + shard)
	c := &ledgerClient{id: 99, outbound: lm.lunits[owner].outbound, h: h, accounts: accounts, start: start, http: &http.Client{Timeout: 5 * time.Second}}
	for i := range 3 {
		call := c.now()
		out, ok := c.do("POST", "/accounts/"+uid+"/deposit", uid, fmt.Sprintf("lag-%d", i), map[string]any{"amount": 1}, 10*time.Second)
		c.record(uid, call, acctInput{Kind: "deposit", Amount: 1}, out, ok)
	}
	out, code := lm.ctl(live[0], "move", strconv.Itoa(shard), "--to", standby)
	if code != exitRefused || !strings.Contains(out, "blocked") {
		t.Fatalf("a move to a lagging standby: exit %d, want %d and blocked:\n%s", code, exitRefused, out)
	}
	after := lm.shards()[shard]
	if after.Unit != owner || after.State != "blocked" {
		t.Fatalf("shard %d after the blocked handoff: %+v, want still on %s, blocked", shard, after, owner)
	}
	t.Logf("a handoff of shard %d to lagging standby %s was blocked: %s", shard, standby, strings.TrimSpace(out))
	// The primary still serves the shard.
	call := c.now()
	res, ok := c.do("POST", "/accounts/"+uid+"/deposit", uid, "lag-after", map[string]any{"amount": 1}, 10*time.Second)
	c.record(uid, call, acctInput{Kind: "deposit", Amount: 1}, res, ok)
	if !ok {
		t.Fatal("the blocked shard's primary refuses writes")
	}
	// Caught up, the same move goes through.
	post(lm.lunits[standby].app, "/debug/apply-delay?delay=0")
	out, code = lm.ctl(live[0], "move", strconv.Itoa(shard), "--to", standby)
	if code != 0 {
		t.Fatalf("the move once the standby caught up: exit %d\n%s", code, out)
	}
	// The old owner, now the first standby, lags in turn: only
	// --accept-data-loss moves the shard back, and the gap is recorded.
	post(lm.lunits[owner].app, "/debug/apply-delay?delay=1h")
	c.outbound = lm.lunits[standby].outbound
	for i := range 2 {
		call := c.now()
		out, ok := c.do("POST", "/accounts/"+uid+"/deposit", uid, fmt.Sprintf("lag-back-%d", i), map[string]any{"amount": 1}, 10*time.Second)
		c.record(uid, call, acctInput{Kind: "deposit", Amount: 1}, out, ok)
	}
	out, code = lm.ctl(live[0], "move", strconv.Itoa(shard), "--to", owner, "--accept-data-loss")
	if code != 0 || !strings.Contains(out, "DATA LOSS ACCEPTED: the standby lacked") {
		t.Fatalf("a forced move to a lagging standby: exit %d\n%s", code, out)
	}
	var hs struct {
		Handoffs []struct {
			Shard          int
			Phase          string
			AcceptDataLoss bool   `json:"accept_data_loss"`
			Gap            uint64 `json:"gap"`
		}
	}
	lm.api(live[0], "GET", "/v1/handoffs", "", &hs)
	if last := hs.Handoffs[len(hs.Handoffs)-1]; last.Shard != shard || last.Phase != "done" || !last.AcceptDataLoss || last.Gap == 0 {
		t.Fatalf("the forced handoff's record: %+v", last)
	}
	if now := lm.shards()[shard]; now.Unit != owner || now.State != "serving" {
		t.Fatalf("shard %d after the forced move: %+v", shard, now)
	}
	post(lm.lunits[owner].app, "/debug/apply-delay?delay=0")
	t.Logf("forced back to %s with --accept-data-loss: %s", owner, strings.TrimSpace(out))
	for _, a := range accounts {
		c.read(a, c.now(), 10*time.Second, "x-cellmesh-consistency", "linearizable")
	}
	p.check("lagging standby blocked, then moved; final reads")
}

// The proof's partition: each region in a network namespace of its own,
// and the region of the raft leader cut off from the other two while
// clients go on writing and reading through every unit, those of the cut
// region included. The minority changes nothing (I4: its replica loses
// the lead and refuses a move), stops taking writes when its lease ends
// (I3: 503 no-lease, and reads marked stale or refused), and takes no
// write after the majority promoted a standby; the majority elects a
// leader and moves every shard of the cut units to standbys. Healed, the
// cut units come back and take traffic again. Every account's history is
// linearizable after each step.
func TestLedgerPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 15 processes in network namespaces")
	}
	if !inOwnNetns(t) {
		return
	}
	rn := newRegionNet(t, "us", "eu", "ap")
	lm := startLedgerMesh(t, rn)
	p := newProof(t, lm)
	p.startClients(lm.order)
	lm.waitUntil("load", 30*time.Second, func() bool { return p.h.acked.Load() > 100 })
	p.check("warm-up")

	old := lm.leader(lm.replicas...)
	region := old.region
	var cutUnits []string
	var majority []*cpProc
	for _, u := range lm.order {
		if lm.lunits[u].region == region {
			cutUnits = append(cutUnits, u)
		}
	}
	for _, r := range lm.replicas {
		if r.region != region {
			majority = append(majority, r)
		}
	}
	before := lm.shardsFrom(old)
	p.h.errorKinds()
	errs0 := p.h.errors.Load()
	cutAt := time.Now()
	rn.cut(region)
	t.Logf("region %s (units %s and the raft leader %s) cut off", region, strings.Join(cutUnits, ", "), old.id)
	// Readers in the cut units, whose writers are mostly stuck retrying.
	p.startReaders(cutUnits)

	// I4: the old leader, in the minority, loses the lead and changes
	// nothing.
	lm.waitUntil("the cut-off replica to know no leader", 30*time.Second, func() bool {
		code, _ := lm.api(old, "GET", "/readyz", "", nil)
		return code == http.StatusServiceUnavailable
	})
	t.Logf("%s knows no leader %s after the cut", old.id, time.Since(cutAt).Round(time.Millisecond))
	var shard int
	var to string
	for s, a := range before {
		if a.Unit != cutUnits[0] {
			shard, to = s, cutUnits[0]
			break
		}
	}
	if out, code := lm.ctl(old, "move", strconv.Itoa(shard), "--to", to); code == 0 || !strings.Contains(out, "503") {
		t.Fatalf("cellmesh move on the cut-off replica: exit %d\n%s", code, out)
	}
	if now := lm.shardsFrom(old); !maps.Equal(now, before) {
		t.Fatalf("the minority's shard map changed while it was cut off:\nnow %+v\nwas %+v", now, before)
	}

	// I3 in the minority: its sidecars' leases run out.
	lm.waitUntil("the cut-off units' leases to end", 30*time.Second, func() bool {
		for _, u := range cutUnits {
			if metricValue(t, metricsOf(t, lm.lunits[u].admin), "cellmesh_lease_remaining_seconds") > 0 {
				return false
			}
		}
		return true
	})
	leaseEnded := time.Since(cutAt)

	// The majority elects a leader and fails the cut units over.
	p.movedOff("the cut units' shards failed over", majority, cutUnits...)
	movedAt := time.Since(cutAt)
	leader := lm.leader(majority...)
	if leader == nil {
		t.Fatal("the majority has no leader")
	}
	var firstPromotion time.Time
	for _, u := range cutUnits {
		if f := lm.checkLeaseWait(t, leader, u); firstPromotion.IsZero() || f.Before(firstPromotion) {
			firstPromotion = f
		}
	}
	kinds := p.h.errorKinds()
	t.Logf("majority: %s leads; %s detected after %s; every shard of the cut units failed over %s after the cut (the first %s after); the cut units' leases ended on their sidecars %s after the cut; failed attempts until then: %s",
		leader.id, cutUnits[0], p.detected(cutUnits[0], cutAt), movedAt.Round(time.Millisecond), firstPromotion.Sub(cutAt).Round(time.Millisecond), leaseEnded.Round(time.Millisecond), kinds)
	p.writesAcked("the majority after the failover", 100)
	t.Logf("failed attempts from the failover until then: %s", p.h.errorKinds())

	// No write acknowledged in the minority after the majority's first
	// promotion; there, writes were refused for want of a lease.
	var lastMinorityAck time.Duration
	p.h.mu.Lock()
	for _, ops := range p.h.ops {
		for _, op := range ops {
			in := op.Input.(acctInput)
			if in.Kind == "read" || in.Unknown || !slices.Contains(cutUnits, p.unitOf[op.ClientId]) {
				continue
			}
			lastMinorityAck = max(lastMinorityAck, time.Duration(op.Return))
		}
	}
	p.h.mu.Unlock()
	if last := p.start.Add(lastMinorityAck); !last.Before(firstPromotion) {
		t.Fatalf("a write acknowledged in the minority at %s, after the majority's first promotion at %s", last.Format(time.RFC3339Nano), firstPromotion.Format(time.RFC3339Nano))
	}
	t.Logf("the minority's last acknowledged write came %s after the cut; %d failed attempts since the cut", p.start.Add(lastMinorityAck).Sub(cutAt).Round(time.Millisecond), p.h.errors.Load()-errs0)
	// Each cut unit, asked through its own sidecar for a shard it owned:
	// writes and linearizable reads refused for want of a lease, other
	// reads answered marked stale. (Not history: refused by the sidecar,
	// or stale by design.)
	for _, u := range cutUnits {
		shard := -1
		for s, a := range before {
			if a.Unit == u {
				shard = s
				break
			}
		}
		uid := strconv.Itoa(2088000000000 + shard)
		for _, probe := range []struct {
			method, path, consistency string
			code                      int
			kind, stale               string
		}{
			{"POST", "/accounts/" + uid + "/deposit", "", 503, "no-lease", ""},
			{"GET", "/accounts/" + uid, "linearizable", 503, "no-lease", ""},
			{"GET", "/accounts/" + uid, "", 200, "", "no-lease"},
		} {
			req, _ := http.NewRequest(probe.method, "http://"+lm.lunits[u].outbound+probe.path, strings.NewReader(`{"amount":1}`))
			req.Host = "ledger"
			req.Header.Set("x-cellmesh-uid", uid)
			req.Header.Set("Idempotency-Key", "probe-"+u)
			if probe.consistency != "" {
				req.Header.Set("x-cellmesh-consistency", probe.consistency)
			}
			resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				t.Fatalf("%s %s through cut unit %s: %v", probe.method, probe.path, u, err)
			}
			resp.Body.Close()
			if kind, stale := resp.Header.Get("x-cellmesh-error"), resp.Header.Get("x-cellmesh-stale"); resp.StatusCode != probe.code || kind != probe.kind || stale != probe.stale {
				t.Fatalf("%s %s (consistency %q) through cut unit %s, which owned shard %d: %d %q, stale %q; want %d %q, stale %q",
					probe.method, probe.path, probe.consistency, u, shard, resp.StatusCode, kind, stale, probe.code, probe.kind, probe.stale)
			}
		}
	}
	p.check("region " + region + " cut off")

	// Healed: the cut units and replica come back; their clients' writes
	// go through again.
	rn.heal()
	healed := time.Now()
	lm.waitUntil("the region back: its replica following, its units up with a lease", 60*time.Second, func() bool {
		if m, ok := lm.members(old); !ok || m.Leader == "" {
			return false
		}
		g := lm.gossipView(leader)
		for _, u := range cutUnits {
			if g.unit(u) != "up" || metricValue(t, metricsOf(t, lm.lunits[u].admin), "cellmesh_lease_remaining_seconds") <= 0 {
				return false
			}
		}
		return true
	})
	t.Logf("healed: region %s back %s after the heal", region, time.Since(healed).Round(time.Millisecond))
	p.stopClients()
	p.startClients(cutUnits)
	p.writesAcked("the healed region's clients", 50)
	p.stopClients()
	c := &ledgerClient{id: 99, outbound: lm.lunits[cutUnits[0]].outbound, h: p.h, accounts: p.accounts, start: p.start, http: &http.Client{Timeout: 5 * time.Second}}
	p.unitOf[c.id] = cutUnits[0]
	for _, a := range p.accounts {
		c.read(a, c.now(), 10*time.Second, "x-cellmesh-consistency", "linearizable")
	}
	p.check("healed; final reads")
}

// TestLedgerHandoffBench measures planned handoffs under load (bench/
// handoff.sh runs it; skipped otherwise): the write pause of each move
// (draining to the new primary's map published), p50 and p99, and the
// client-visible errors while they run.
func TestLedgerHandoffBench(t *testing.T) {
	moves, _ := strconv.Atoi(os.Getenv("CELLMESH_BENCH_HANDOFFS"))
	if moves == 0 {
		t.Skip("a benchmark: bench/handoff.sh runs it (CELLMESH_BENCH_HANDOFFS=N)")
	}
	lm := startLedgerMesh(t, nil)
	h := &history{ops: map[string][]porcupine.Operation{}}
	var accounts []string
	for s := range 60 {
		accounts = append(accounts, strconv.Itoa(2088000000000+s))
	}
	start := time.Now()
	var seq atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, u := range lm.order {
		c := &ledgerClient{id: i, outbound: lm.lunits[u].outbound, h: h, accounts: accounts, start: start, http: &http.Client{Timeout: 10 * time.Second}}
		wg.Add(1)
		go func() { defer wg.Done(); c.run(stop, &seq) }()
	}
	lm.waitUntil("load", 30*time.Second, func() bool { return h.acked.Load() > 200 })
	errs0, acked0 := h.errors.Load(), h.acked.Load()
	h.errorKinds() // counted from here
	var pauses []float64
	leader := lm.leader(lm.replicas...)
	for i := range moves {
		shard := (i * 7) % 60
		var cur struct {
			Unit     string
			Standbys []string
		}
		lm.api(leader, "GET", "/v1/shards/"+strconv.Itoa(shard), "", &cur)
		var res struct {
			Handoff struct {
				WritePauseSeconds float64 `json:"write_pause_seconds"`
			}
		}
		code, body := lm.api(leader, "POST", "/v1/shards/"+strconv.Itoa(shard)+"/move", `{"to":"`+cur.Standbys[0]+`"}`, &res)
		if code != 200 {
			t.Fatalf("move %d of shard %d to %s: %d %s", i, shard, cur.Standbys[0], code, body)
		}
		pauses = append(pauses, res.Handoff.WritePauseSeconds)
		time.Sleep(200 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	slices.Sort(pauses)
	q := func(f float64) float64 { return pauses[min(len(pauses)-1, int(f*float64(len(pauses))))] }
	t.Logf("%d planned handoffs under load: write pause p50 %.0f ms, p99 %.0f ms, max %.0f ms; %d client-visible errors (%s), %d writes acknowledged meanwhile",
		len(pauses), 1000*q(0.5), 1000*q(0.99), 1000*pauses[len(pauses)-1], h.errors.Load()-errs0, h.errorKinds(), h.acked.Load()-acked0)
	for acct, ops := range h.ops {
		if porcupine.CheckOperationsTimeout(accountModel, ops, 30*time.Second) == porcupine.Illegal {
			t.Fatalf("account %s's history is not linearizable", acct)
		}
	}
}
