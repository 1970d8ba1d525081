package ledger

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeMesh stands in for the sidecars in these unit tests (the process
// tests run the real ones): it routes /accounts requests by uid mod 100 to
// the shard's owner with its shard and epoch, requests pinned with
// x-cellmesh-target-unit to that unit, and serves the map's standbys on
// /config.
type fakeMesh struct {
	t       *testing.T
	mu      sync.Mutex
	ledgers map[string]*Ledger
	owner   map[int]string
	epoch   map[int]uint64
	standby map[int][]string
	down    map[string]bool
	srv     *httptest.Server
}

func newFakeMesh(t *testing.T) *fakeMesh {
	f := &fakeMesh{t: t, ledgers: map[string]*Ledger{}, owner: map[int]string{}, epoch: map[int]uint64{}, standby: map[int][]string{}, down: map[string]bool{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeMesh) addr() string { return strings.TrimPrefix(f.srv.URL, "http://") }

func (f *fakeMesh) assign(shard int, owner string, epoch uint64, standbys ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.owner[shard], f.epoch[shard], f.standby[shard] = owner, epoch, standbys
}

func (f *fakeMesh) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	if r.URL.Path == "/config" {
		type a struct {
			Shard    int      `json:"shard"`
			Primary  string   `json:"primary"`
			Epoch    uint64   `json:"epoch"`
			Standbys []string `json:"standbys"`
		}
		var as []a
		for s, sb := range f.standby {
			as = append(as, a{s, f.owner[s], f.epoch[s], sb})
		}
		f.mu.Unlock()
		writeJSON(w, 200, map[string]any{"topology": map[string]any{"assignments": as}})
		return
	}
	unit := r.Header.Get("x-cellmesh-target-unit")
	if unit == "" {
		uid, _ := strconv.Atoi(r.Header.Get("x-cellmesh-uid"))
		shard := uid % 100
		unit = f.owner[shard]
		r.Header.Set("x-cellmesh-shard", strconv.Itoa(shard))
		r.Header.Set("x-cellmesh-epoch", strconv.FormatUint(f.epoch[shard], 10))
	}
	l, down := f.ledgers[unit], f.down[unit]
	f.mu.Unlock()
	if l == nil || down {
		http.Error(w, "cellmesh: no endpoint of unit "+unit, http.StatusServiceUnavailable)
		return
	}
	l.Handler().ServeHTTP(w, r)
}

func (f *fakeMesh) start(unit string) *Ledger {
	f.t.Helper()
	l, err := New(Config{Unit: unit, Region: "r-" + unit, DataDir: f.t.TempDir(), Mesh: f.addr(), SidecarAdmin: f.addr()})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { l.Close() })
	f.mu.Lock()
	f.ledgers[unit] = l
	f.mu.Unlock()
	l.refreshMap(context.Background())
	return l
}

// call sends a request through the fake mesh and decodes the answer.
func (f *fakeMesh) call(method, path, uid, key string, body any) (int, map[string]any) {
	f.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, f.srv.URL+path, rd)
	if uid != "" {
		req.Header.Set("x-cellmesh-uid", uid)
	}
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

func report(t *testing.T, l *Ledger, shard int) ShardReport {
	t.Helper()
	rep, err := l.report()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rep.Shards {
		if s.Shard == shard {
			return s
		}
	}
	return ShardReport{Shard: shard}
}

func balanceOf(t *testing.T, f *fakeMesh, uid string) int64 {
	t.Helper()
	code, out := f.call("GET", "/accounts/"+uid, uid, "", nil)
	if code != 200 {
		t.Fatalf("balance of %s: %d %v", uid, code, out)
	}
	return int64(out["balance"].(float64))
}

func TestLedgerReplicatesFencesAndFailsOver(t *testing.T) {
	f := newFakeMesh(t)
	f.assign(7, "us-east-1", 1, "eu-west-1")
	f.assign(57, "eu-west-1", 1, "us-east-1")
	a, b := f.start("us-east-1"), f.start("eu-west-1")
	const alice, bob = "2088000000007", "2088000000057"

	if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d1", map[string]any{"amount": 100}); code != 200 || out["balance"].(float64) != 100 {
		t.Fatalf("deposit: %d %v", code, out)
	}
	// A retry with the same key is answered with the first result.
	if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d1", map[string]any{"amount": 100}); code != 200 || out["balance"].(float64) != 100 {
		t.Fatalf("retried deposit: %d %v", code, out)
	}
	if r := report(t, b, 7); r.Role != RoleStandby || r.Received != 1 || r.Applied != 1 || !r.Sync {
		t.Fatalf("standby's report after one write: %+v", r)
	}
	// A transfer across units: debit here, credit at bob's home.
	if code, out := f.call("POST", "/accounts/"+alice+"/transfer", alice, "t1", map[string]any{"to": bob, "amount": 30}); code != 200 || out["balance"].(float64) != 70 {
		t.Fatalf("transfer: %d %v", code, out)
	}
	if code, out := f.call("POST", "/accounts/"+alice+"/transfer", alice, "t2", map[string]any{"to": bob, "amount": 1000}); code != 200 || out["ok"].(bool) || out["error"] != "insufficient funds" {
		t.Fatalf("transfer over the balance: %d %v", code, out)
	}
	if got := balanceOf(t, f, bob); got != 30 {
		t.Fatalf("bob has %d, want 30", got)
	}
	// Bad input changes nothing.
	for _, tc := range []struct {
		uid, path, key string
		body           any
		want           int
	}{
		{alice, "/accounts/" + alice + "/deposit", "", map[string]any{"amount": 5}, 400},
		{alice, "/accounts/" + alice + "/deposit", "k", map[string]any{"amount": -5}, 400},
		{alice, "/accounts/" + alice + "/deposit", "k", map[string]any{"amount": 5, "x": 1}, 400},
		{bob, "/accounts/" + alice + "/deposit", "k", map[string]any{"amount": 5}, 400},
		{alice, "/accounts/" + alice + "/transfer", "k", map[string]any{"to": alice, "amount": 5}, 400},
	} {
		if code, out := f.call("POST", tc.path, tc.uid, tc.key, tc.body); code != tc.want {
			t.Errorf("%s %v: %d %v, want %d", tc.path, tc.body, code, out, tc.want)
		}
	}
	if got := balanceOf(t, f, alice); got != 70 {
		t.Fatalf("alice has %d after refused writes, want 70", got)
	}

	// The standby lags: received ahead of applied until the delay is off.
	post := func(l *Ledger, path string) (int, string) {
		rec := httptest.NewRecorder()
		l.Handler().ServeHTTP(rec, httptest.NewRequest("POST", path, nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := post(b, "/debug/apply-delay?delay=1h"); code != 200 {
		t.Fatalf("apply delay: %d %s", code, body)
	}
	f.call("POST", "/accounts/"+alice+"/deposit", alice, "d2", map[string]any{"amount": 1})
	if r := report(t, b, 7); r.Received != r.Applied+1 {
		t.Fatalf("lagging standby: %+v, want received one ahead of applied", r)
	}
	post(b, "/debug/apply-delay?delay=0")
	deadline := time.Now().Add(10 * time.Second)
	for r := report(t, b, 7); r.Applied != r.Received; r = report(t, b, 7) {
		if time.Now().After(deadline) {
			t.Fatalf("standby did not catch up: %+v", r)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Failover of shard 7 to eu-west-1 at epoch 2: promote, demote; the
	// old primary refuses epoch 1, the new one has every write.
	if code, body := post(b, "/.well-known/cellmesh/promote?shard=7&epoch=2"); code != 200 {
		t.Fatalf("promote: %d %s", code, body)
	}
	if code, body := post(a, "/.well-known/cellmesh/demote?shard=7&epoch=2"); code != 200 {
		t.Fatalf("demote: %d %s", code, body)
	}
	if code, body := post(a, "/.well-known/cellmesh/promote?shard=7&epoch=1"); code != http.StatusConflict {
		t.Fatalf("promote at an older epoch: %d %s", code, body)
	}
	if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d3", map[string]any{"amount": 5}); code != http.StatusConflict {
		t.Fatalf("a write at the old epoch to the demoted primary: %d %v", code, out)
	}
	f.assign(7, "eu-west-1", 2, "us-east-1")
	b.refreshMap(context.Background())
	if got := balanceOf(t, f, alice); got != 71 {
		t.Fatalf("alice on the new primary has %d, want 71", got)
	}
	if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d3", map[string]any{"amount": 5}); code != 200 || out["balance"].(float64) != 76 {
		t.Fatalf("deposit on the new primary: %d %v", code, out)
	}
	if r := report(t, a, 7); r.Role != RoleStandby || r.Epoch != 2 || r.Received != report(t, b, 7).Received {
		t.Fatalf("the old primary as standby: %+v vs %+v", r, report(t, b, 7))
	}
	// A write whose standby is unreachable is not acknowledged, and not
	// applied; the retry with the same key applies it once.
	f.mu.Lock()
	f.down["us-east-1"] = true
	f.mu.Unlock()
	if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d4", map[string]any{"amount": 1}); code != http.StatusServiceUnavailable {
		t.Fatalf("a write with its standby down: %d %v", code, out)
	}
	if got := balanceOf(t, f, alice); got != 76 {
		t.Fatalf("an unacknowledged write was applied: %d", got)
	}
	f.mu.Lock()
	f.down["us-east-1"] = false
	f.mu.Unlock()
	for range 2 {
		if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, "d4", map[string]any{"amount": 1}); code != 200 || out["balance"].(float64) != 77 {
			t.Fatalf("the retried write: %d %v", code, out)
		}
	}
}

// A write the old primary appended but never replicated (its standby was
// down) must not survive a failover: when the old primary comes back as a
// standby, the new primary's log replaces its unapplied tail, and the two
// hold the same accounts.
func TestLedgerOldPrimaryTailDropped(t *testing.T) {
	f := newFakeMesh(t)
	f.assign(7, "us-east-1", 1, "eu-west-1")
	a, b := f.start("us-east-1"), f.start("eu-west-1")
	const alice = "2088000000007"
	setDown := func(unit string, down bool) {
		f.mu.Lock()
		f.down[unit] = down
		f.mu.Unlock()
	}
	deposit := func(key string, amount int, want int) {
		t.Helper()
		if code, out := f.call("POST", "/accounts/"+alice+"/deposit", alice, key, map[string]any{"amount": amount}); code != want {
			t.Fatalf("deposit %s: %d %v, want %d", key, code, out, want)
		}
	}
	deposit("d1", 100, 200)
	setDown("eu-west-1", true)
	deposit("x", 1000, http.StatusServiceUnavailable) // appended at us-east-1, never replicated
	setDown("eu-west-1", false)

	// Failover to eu-west-1 at epoch 2 while us-east-1 is away.
	setDown("us-east-1", true)
	f.assign(7, "eu-west-1", 2, "us-east-1")
	if _, err := b.become(7, RolePrimary, 2); err != nil {
		t.Fatal(err)
	}
	b.refreshMap(context.Background())
	deposit("y", 10, http.StatusServiceUnavailable) // its standby is away: not acknowledged
	setDown("us-east-1", false)
	a.refreshMap(context.Background()) // steps down: the map gives shard 7 to eu-west-1
	deposit("v", 1, 200)
	ra, rb := report(t, a, 7), report(t, b, 7)
	if ra.Role != RoleStandby || ra.Received != rb.Received || ra.Applied != rb.Applied || !ra.Sync {
		t.Fatalf("the old primary as standby: %+v, the new primary: %+v", ra, rb)
	}
	var balA, balB int64
	_ = a.st.view(7, func(tx shardTx) error { balA = tx.balance(alice); return nil })
	_ = b.st.view(7, func(tx shardTx) error { balB = tx.balance(alice); return nil })
	if balA != balB || balB != 111 {
		t.Fatalf("balances: old primary %d, new primary %d, want both 111 (100 + the retried 10 + 1, never the 1000)", balA, balB)
	}
}

// An idempotency key belongs to one account and one request: two users
// may use the same key; the same key for another request is refused.
func TestLedgerIdempotencyKeys(t *testing.T) {
	f := newFakeMesh(t)
	f.assign(7, "us-east-1", 1, "eu-west-1")
	f.assign(57, "eu-west-1", 1, "us-east-1")
	f.start("us-east-1")
	f.start("eu-west-1")
	const alice, carol, bob = "2088000000007", "2088000000107", "2088000000057" // alice and carol share shard 7
	for _, c := range []struct {
		uid  string
		amt  int
		code int
		bal  float64
	}{{alice, 50, 200, 50}, {carol, 7, 200, 7}, {alice, 50, 200, 50}, {alice, 60, http.StatusUnprocessableEntity, 0}} {
		code, out := f.call("POST", "/accounts/"+c.uid+"/deposit", c.uid, "k1", map[string]any{"amount": c.amt})
		if code != c.code || (code == 200 && out["balance"].(float64) != c.bal) {
			t.Fatalf("deposit %d to %s with key k1: %d %v, want %d balance %v", c.amt, c.uid, code, out, c.code, c.bal)
		}
	}
	// Transfers from two senders with the same key each credit bob.
	for _, from := range []string{alice, carol} {
		if code, out := f.call("POST", "/accounts/"+from+"/transfer", from, "t1", map[string]any{"to": bob, "amount": 5}); code != 200 || !out["ok"].(bool) {
			t.Fatalf("transfer from %s: %d %v", from, code, out)
		}
	}
	if got := balanceOf(t, f, bob); got != 10 {
		t.Fatalf("bob has %d after two transfers of 5 with the same key from two senders, want 10", got)
	}
}

// A shard never written still has a standby that knows it is in sync: the
// primary takes the shards the map gives it and tells their standbys, so
// an unplanned failover can prove nothing is lost without the primary's
// last word (a control-plane leader that never heard from it).
func TestLedgerFreshShardStandbyInSync(t *testing.T) {
	f := newFakeMesh(t)
	f.assign(9, "us-east-1", 3, "eu-west-1")
	a, b := f.start("us-east-1"), f.start("eu-west-1")
	a.claimFresh()
	if r := report(t, a, 9); r.Role != RolePrimary || r.Epoch != 3 {
		t.Fatalf("the primary of a shard it never wrote: %+v, want primary at epoch 3", r)
	}
	a.notifyStandbys(context.Background())
	if r := report(t, b, 9); r.Role != RoleStandby || r.Epoch != 3 || !r.Sync || r.Received != 0 {
		t.Fatalf("the standby of a shard never written: %+v, want standby at epoch 3, in sync, empty", r)
	}
	// The standby takes nothing it is not given.
	if r := report(t, b, 10); r.Role != "" {
		t.Fatalf("a shard outside the map on the standby: %+v", r)
	}
}
