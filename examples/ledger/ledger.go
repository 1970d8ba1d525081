package ledger

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Config configures a ledger instance: one per unit. The zero value of a
// field means its default.
type Config struct {
	// Unit and Region are where this instance serves, required.
	Unit, Region string
	// Service is the ledger's service name in the mesh. Default "ledger".
	Service string
	// DataDir holds ledger.db, required.
	DataDir string
	// Mesh is the sidecar's outbound address (host:port), required: the
	// ledger reaches other units through it (replication, transfers).
	Mesh string
	// SidecarAdmin is the sidecar's admin address (host:port), required:
	// the ledger reads the shard map there (/config) for each shard's
	// standby unit.
	SidecarAdmin string
	// ApplyDelay makes a standby apply each replicated entry this much
	// later than it received it (fault injection: a lagging standby).
	ApplyDelay time.Duration
	Logger     *slog.Logger
	Registry   *prometheus.Registry
}

// Ledger is one unit's instance of the ledger service.
type Ledger struct {
	cfg    Config
	log    *slog.Logger
	st     *store
	client *http.Client
	m      *metrics

	locksMu sync.Mutex
	locks   map[int]*sync.Mutex

	view     atomic.Pointer[map[int]assignment] // the sidecar's map; nil before it was read
	applyLag atomic.Int64                       // ApplyDelay, changeable at run time (nanoseconds)
	applying sync.Map                           // shard -> true while applyLater runs for it
}

// New opens the ledger's data. Run serves.
func New(cfg Config) (*Ledger, error) {
	var problems []string
	for _, f := range []struct{ name, v string }{{"unit", cfg.Unit}, {"region", cfg.Region}, {"data directory", cfg.DataDir}, {"mesh (the sidecar's outbound address)", cfg.Mesh}, {"sidecar admin address", cfg.SidecarAdmin}} {
		if f.v == "" {
			problems = append(problems, f.name+" is required")
		}
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("ledger configuration: %v", problems)
	}
	if cfg.Service == "" {
		cfg.Service = "ledger"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	st, err := openStore(filepath.Join(cfg.DataDir, "ledger.db"))
	if err != nil {
		return nil, err
	}
	l := &Ledger{
		cfg: cfg, st: st, locks: map[int]*sync.Mutex{},
		log:    cfg.Logger.With("component", "ledger", "unit", cfg.Unit),
		client: &http.Client{Timeout: 5 * time.Second},
	}
	l.applyLag.Store(int64(cfg.ApplyDelay))
	l.m = newMetrics(cfg.Registry, l)
	return l, nil
}

// Close closes the data.
func (l *Ledger) Close() error { return l.st.close() }

func (l *Ledger) lock(shard int) *sync.Mutex {
	l.locksMu.Lock()
	defer l.locksMu.Unlock()
	mu := l.locks[shard]
	if mu == nil {
		mu = &sync.Mutex{}
		l.locks[shard] = mu
	}
	return mu
}

// Run follows the sidecar's map (standbys) and keeps standbys told of
// what is committed, until ctx ends.
func (l *Ledger) Run(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		l.refreshMap(ctx)
		l.claimFresh()
		l.notifyStandbys(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// assignment is a shard's owner as the sidecar's map says.
type assignment struct {
	Primary  string
	Epoch    uint64
	Standbys []string
}

// refreshMap reads the shard map from the sidecar's /config, and steps
// down from the primary role of every shard the map gives another unit at
// a newer epoch (a failover happened while this unit was away).
func (l *Ledger) refreshMap(ctx context.Context) {
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+l.cfg.SidecarAdmin+"/config", nil)
	resp, err := l.client.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	var st struct {
		Topology *struct {
			Assignments []struct {
				Shard    int      `json:"shard"`
				Primary  string   `json:"primary"`
				Epoch    uint64   `json:"epoch"`
				Standbys []string `json:"standbys"`
			} `json:"assignments"`
		} `json:"topology"`
	}
	if json.NewDecoder(resp.Body).Decode(&st) != nil || st.Topology == nil {
		return
	}
	m := map[int]assignment{}
	for _, a := range st.Topology.Assignments {
		m[a.Shard] = assignment{Primary: a.Primary, Epoch: a.Epoch, Standbys: a.Standbys}
	}
	l.view.Store(&m)
	shards, err := l.st.shards()
	if err != nil {
		return
	}
	for shard, meta := range shards {
		if a, ok := m[shard]; ok && meta.Role == RolePrimary && a.Epoch > meta.Epoch && a.Primary != l.cfg.Unit {
			if _, err := l.become(shard, RoleStandby, a.Epoch); err == nil {
				l.log.Info("stepped down: the map gives the shard to another unit", "shard", shard, "owner", a.Primary, "epoch", a.Epoch)
			}
		}
	}
}

// claimFresh takes as primary every shard the map gives this unit that it
// holds nothing of (never written), as its first write would take it:
// notifyStandbys then tells the standby, which so knows it is in sync with
// an empty log. Without that word a failover could not tell a fresh
// standby from a wiped one, and would block. (Run calls it, holding no
// shard's lock.)
func (l *Ledger) claimFresh() {
	view := l.view.Load()
	if view == nil {
		return
	}
	shards, err := l.st.shards()
	if err != nil {
		return
	}
	for shard, a := range *view {
		if _, held := shards[shard]; !held && a.Primary == l.cfg.Unit {
			_, _ = l.become(shard, RolePrimary, a.Epoch)
		}
	}
}

// notifyStandbys tells each primary shard's standby the committed end, so
// it knows it is in sync while no write comes.
func (l *Ledger) notifyStandbys(ctx context.Context) {
	shards, err := l.st.shards()
	if err != nil {
		return
	}
	for shard, m := range shards {
		if m.Role != RolePrimary {
			continue
		}
		mu := l.lock(shard)
		if !mu.TryLock() {
			continue // a write is replicating: it tells the standby
		}
		var cur shardMeta
		_ = l.st.view(shard, func(t shardTx) error { cur, _ = t.meta(); return nil })
		if cur.Role == RolePrimary {
			_ = l.replicate(ctx, shard, cur)
		}
		mu.Unlock()
	}
}

// Replication is the answer of GET /.well-known/cellmesh/replication.
type Replication struct {
	Shards []ShardReport `json:"shards"`
}

// ShardReport is one shard's watermarks on this unit.
type ShardReport struct {
	Shard     int    `json:"shard"`
	Role      string `json:"role"`
	Epoch     uint64 `json:"epoch"`
	Committed uint64 `json:"committed"`
	Received  uint64 `json:"received"`
	Applied   uint64 `json:"applied"`
	Sync      bool   `json:"sync"`
}

func (l *Ledger) report() (Replication, error) {
	shards, err := l.st.shards()
	if err != nil {
		return Replication{}, err
	}
	out := Replication{Shards: []ShardReport{}}
	for shard, m := range shards {
		r := ShardReport{Shard: shard, Role: m.Role, Epoch: m.Epoch, Committed: m.Committed, Received: m.Received, Applied: m.Applied}
		r.Sync = m.sync()
		out.Shards = append(out.Shards, r)
	}
	return out, nil
}

// become takes the role at epoch (promote, demote): refused below the
// epoch seen; a promotion applies the whole log first (it is the
// standby's, all of it durable) and makes it the committed end.
func (l *Ledger) become(shard int, role string, epoch uint64) (shardMeta, error) {
	mu := l.lock(shard)
	mu.Lock()
	defer mu.Unlock()
	var out shardMeta
	err := l.st.update(shard, func(t shardTx) error {
		m, _ := t.meta()
		if epoch < m.Epoch {
			return fmt.Errorf("%w: shard %d has seen epoch %d, not %d", errStaleEpoch, shard, m.Epoch, epoch)
		}
		if m.Epoch == epoch && m.Role == role {
			out = m
			return nil // idempotent
		}
		if epoch == m.Epoch && role == RolePrimary && m.Role == RoleStandby && m.Epoch > 0 {
			// Demoted at this epoch already: another unit is the primary.
			return fmt.Errorf("%w: shard %d was demoted at epoch %d; promote at a newer epoch", errStaleEpoch, shard, epoch)
		}
		m.Epoch, m.Role = epoch, role
		if role == RolePrimary {
			if err := t.applyUpTo(&m, m.Received); err != nil {
				return err
			}
			m.Committed = m.Received
		}
		out = m
		return t.putMeta(m)
	})
	if err == nil {
		l.log.Info("shard role", "shard", shard, "role", role, "epoch", epoch, "received", out.Received, "applied", out.Applied)
	}
	return out, err
}

// errNotReplicated: no standby took the entry; the write is not
// acknowledged (it waits in the log and goes out with the next write).
var errNotReplicated = errors.New("not replicated")

// write appends op to the shard's log at epoch, replicates it to the
// standby, then applies it: the answer comes only once the standby holds
// it. op.ID is the client's key scoped by the account: a write whose ID
// was applied returns its first result (or errKeyReused when the key came
// with another request).
func (l *Ledger) write(ctx context.Context, shard int, epoch uint64, op Op) (Result, error) {
	mu := l.lock(shard)
	mu.Lock()
	defer mu.Unlock()
	var m shardMeta
	var done *Result
	err := l.st.update(shard, func(t shardTx) error {
		var err error
		if m, err = l.owner(t, epoch); err != nil {
			return err
		}
		if r, ok := t.result(op.ID); ok {
			done = &r
			return nil
		}
		// An entry of the same op waiting in the uncommitted tail (an
		// earlier attempt whose replication failed) is not appended again.
		for s := m.Committed + 1; s <= m.Received; s++ {
			if e, ok := t.entry(s); ok && e.Op.ID == op.ID {
				if e.Op.fingerprint() != op.fingerprint() {
					return fmt.Errorf("%w: %q was used for %s", errKeyReused, op.ID, e.Op.fingerprint())
				}
				return nil
			}
		}
		m.Received++
		if err := t.putEntry(Entry{Seq: m.Received, Epoch: epoch, Op: op}); err != nil {
			return err
		}
		return t.putMeta(m)
	})
	if err != nil {
		return Result{}, err
	}
	if done != nil {
		if done.Request != op.fingerprint() {
			return Result{}, fmt.Errorf("%w: %q was used for %s", errKeyReused, op.ID, done.Request)
		}
		l.m.idempotent.Inc()
		return *done, nil
	}
	if err := l.replicate(ctx, shard, m); err != nil {
		return Result{}, err
	}
	var r Result
	err = l.st.update(shard, func(t shardTx) error {
		cur, _ := t.meta()
		if cur.Epoch != m.Epoch || cur.Role != RolePrimary {
			return fmt.Errorf("%w: shard %d moved to epoch %d while replicating", errStaleEpoch, shard, cur.Epoch)
		}
		if err := t.applyUpTo(&cur, cur.Received); err != nil {
			return err
		}
		cur.Committed = cur.Received
		var ok bool
		if r, ok = t.result(op.ID); !ok {
			return fmt.Errorf("op %s applied without a result", op.ID)
		}
		return t.putMeta(cur)
	})
	return r, err
}

// owner checks that this unit may write the shard at epoch: a request
// fenced by the sidecar at an epoch newer than the one seen makes this
// unit the primary (as a promotion would); an older one is refused.
func (l *Ledger) owner(t shardTx, epoch uint64) (shardMeta, error) {
	m, _ := t.meta()
	switch {
	case epoch < m.Epoch:
		return m, fmt.Errorf("%w: shard %d is at epoch %d here; the request came at %d", errStaleEpoch, t.shard, m.Epoch, epoch)
	case epoch == m.Epoch && m.Role != RolePrimary && m.Epoch > 0:
		return m, fmt.Errorf("%w: this unit is the shard %d's standby at epoch %d", errStaleEpoch, t.shard, epoch)
	case epoch > m.Epoch || m.Role != RolePrimary:
		m.Epoch, m.Role = epoch, RolePrimary
		if err := t.applyUpTo(&m, m.Received); err != nil {
			return m, err
		}
		m.Committed = m.Received
		if err := t.putMeta(m); err != nil {
			return m, err
		}
	}
	return m, nil
}

// replicateRequest is the body of POST /.well-known/cellmesh/replicate:
// entries following the one at PrevSeq, of epoch PrevEpoch (0, 0: the
// log's start), as in Raft, so a standby whose log differs there finds
// out.
type replicateRequest struct {
	Shard     int     `json:"shard"`
	Epoch     uint64  `json:"epoch"`
	Committed uint64  `json:"committed"`
	PrevSeq   uint64  `json:"prev_seq"`
	PrevEpoch uint64  `json:"prev_epoch"`
	Entries   []Entry `json:"entries"`
}

type replicateAnswer struct {
	// OK: the standby holds the log up to Received, the request's entries
	// included.
	OK       bool   `json:"ok"`
	Received uint64 `json:"received"`
	Epoch    uint64 `json:"epoch"`
	Error    string `json:"error,omitempty"`
}

// maxBatch bounds the entries sent at once (a standby catching up).
const maxBatch = 256

// target is the unit the shard's writes replicate to: the first standby
// of the sidecar's map, when the map agrees this unit is the primary at
// epoch. A map older than the epoch is read again first.
func (l *Ledger) target(ctx context.Context, shard int, epoch uint64) (string, bool, error) {
	for try := 0; ; try++ {
		view := l.view.Load()
		if view != nil {
			a, ok := (*view)[shard]
			switch {
			case !ok:
				return "", false, fmt.Errorf("shard %d is not in the map", shard)
			case a.Epoch > epoch || (a.Epoch == epoch && a.Primary != l.cfg.Unit):
				return "", false, fmt.Errorf("%w: the map gives shard %d to %s at epoch %d", errStaleEpoch, shard, a.Primary, a.Epoch)
			case a.Epoch == epoch:
				for _, u := range a.Standbys {
					if u != l.cfg.Unit {
						return u, true, nil
					}
				}
				return "", false, nil // no standby declared: a single copy
			}
		}
		if try == 10 {
			if view == nil {
				return "", false, fmt.Errorf("%w: %w", errNotReplicated, errNoMap)
			}
			return "", false, fmt.Errorf("%w: the sidecar's map is behind epoch %d of shard %d", errNotReplicated, epoch, shard)
		}
		l.refreshMap(ctx)
		select {
		case <-ctx.Done():
			return "", false, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// replicate sends the standby the entries it lacks up to m.Received, with
// the committed end, until it holds them all. The shard's lock is held.
func (l *Ledger) replicate(ctx context.Context, shard int, m shardMeta) error {
	standby, ok, err := l.target(ctx, shard, m.Epoch)
	if err != nil || !ok {
		return err
	}
	from := max(m.Received, 1) // the standby most often has all but the newest
	for range 64 {
		req := replicateRequest{Shard: shard, Epoch: m.Epoch, Committed: m.Committed, PrevSeq: from - 1}
		if err := l.st.view(shard, func(t shardTx) error {
			if req.PrevSeq > 0 {
				e, ok := t.entry(req.PrevSeq)
				if !ok {
					return fmt.Errorf("shard %d: log entry %d missing", shard, req.PrevSeq)
				}
				req.PrevEpoch = e.Epoch
			}
			for s := from; s <= m.Received && len(req.Entries) < maxBatch; s++ {
				e, ok := t.entry(s)
				if !ok {
					return fmt.Errorf("shard %d: log entry %d missing", shard, s)
				}
				req.Entries = append(req.Entries, e)
			}
			return nil
		}); err != nil {
			return err
		}
		ans, err := l.send(ctx, standby, req)
		if err != nil {
			l.m.replication.WithLabelValues("failed").Inc()
			return fmt.Errorf("%w: standby %s: %v", errNotReplicated, standby, err)
		}
		switch {
		case ans.Epoch > m.Epoch:
			return fmt.Errorf("%w: standby %s has seen epoch %d", errStaleEpoch, standby, ans.Epoch)
		case ans.OK && ans.Received >= m.Received:
			l.m.replication.WithLabelValues("ok").Inc()
			return nil
		case ans.OK:
			from = ans.Received + 1 // the batch was bounded: send the rest
		default:
			from = max(min(ans.Received+1, from-1), 1) // the logs differ or the standby is behind: go back
		}
	}
	return fmt.Errorf("%w: standby %s is still catching up", errNotReplicated, standby)
}

func (l *Ledger) send(ctx context.Context, standby string, body replicateRequest) (replicateAnswer, error) {
	data, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, "POST", "http://"+l.cfg.Mesh+"/.well-known/cellmesh/replicate", bytes.NewReader(data))
	if err != nil {
		return replicateAnswer{}, err
	}
	req.Host = l.cfg.Service
	req.Header.Set("x-cellmesh-target-unit", standby)
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.client.Do(req)
	if err != nil {
		return replicateAnswer{}, err
	}
	defer resp.Body.Close()
	var ans replicateAnswer
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err := json.Unmarshal(raw, &ans); err != nil {
		return ans, fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(raw))
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return ans, nil
	case resp.StatusCode == http.StatusConflict && ans.Epoch > body.Epoch:
		return ans, nil // a newer epoch: the caller steps down
	case resp.StatusCode == http.StatusConflict && !ans.OK && ans.Epoch <= body.Epoch && ans.Error == "":
		return ans, nil // behind, or its log differs: the caller goes back
	}
	return ans, fmt.Errorf("HTTP %d: %s", resp.StatusCode, ans.Error)
}

// receive takes a batch from the primary: refused below the epoch seen;
// the log must match at PrevSeq (else the standby says so, dropping an
// unapplied tail that differs); entries it holds are skipped.
func (l *Ledger) receive(req replicateRequest) (replicateAnswer, int, error) {
	if req.Shard < -1 || len(req.Entries) > maxBatch {
		return replicateAnswer{}, http.StatusBadRequest, fmt.Errorf("shard %d, %d entries: want a shard and at most %d entries", req.Shard, len(req.Entries), maxBatch)
	}
	mu := l.lock(req.Shard)
	mu.Lock()
	defer mu.Unlock()
	var ans replicateAnswer
	code := http.StatusOK
	var appended int
	err := l.st.update(req.Shard, func(t shardTx) error {
		m, _ := t.meta()
		ans.Epoch, ans.Received = m.Epoch, m.Received
		switch {
		case req.Epoch < m.Epoch:
			code, ans.Error = http.StatusConflict, fmt.Sprintf("stale epoch %d: this unit has seen epoch %d", req.Epoch, m.Epoch)
			return nil
		case req.Epoch == m.Epoch && m.Role == RolePrimary:
			code, ans.Error = http.StatusConflict, fmt.Sprintf("this unit is the primary at epoch %d", m.Epoch)
			return nil
		}
		if req.Epoch > m.Epoch || m.Role == "" {
			m.Epoch, m.Role = req.Epoch, RoleStandby
		}
		if req.Epoch != m.PrimaryEpoch {
			m.PrimaryEpoch, m.Committed = req.Epoch, 0 // a new primary's word replaces the old one's
		}
		// The log must hold the primary's entry at PrevSeq.
		if req.PrevSeq > m.Received {
			code = http.StatusConflict // behind: Received says from where
			ans.Epoch = m.Epoch
			return t.putMeta(m)
		}
		if req.PrevSeq > 0 {
			if e, ok := t.entry(req.PrevSeq); !ok || e.Epoch != req.PrevEpoch {
				if req.PrevSeq <= m.Applied {
					return fmt.Errorf("shard %d: entry %d differs from the primary's, and is applied", req.Shard, req.PrevSeq)
				}
				if err := t.truncate(req.PrevSeq); err != nil {
					return err
				}
				m.Received = req.PrevSeq - 1
				code, ans.Epoch, ans.Received = http.StatusConflict, m.Epoch, m.Received
				return t.putMeta(m)
			}
		}
		for _, e := range req.Entries {
			if e.Seq <= m.Received {
				if have, ok := t.entry(e.Seq); ok && have.Epoch == e.Epoch && have.Op.ID == e.Op.ID {
					continue
				}
				if e.Seq <= m.Applied {
					return fmt.Errorf("shard %d: entry %d differs from the primary's, and is applied", req.Shard, e.Seq)
				}
				if err := t.truncate(e.Seq); err != nil {
					return err
				}
				m.Received = e.Seq - 1
			}
			if e.Seq != m.Received+1 {
				break
			}
			if err := t.putEntry(e); err != nil {
				return err
			}
			m.Received = e.Seq
			appended++
		}
		ans.OK = true
		m.Committed = max(m.Committed, min(req.Committed, m.Received))
		ans.Epoch, ans.Received = m.Epoch, m.Received
		if l.applyLag.Load() == 0 {
			if err := t.applyUpTo(&m, m.Received); err != nil {
				return err
			}
		}
		return t.putMeta(m)
	})
	if err == nil && l.applyLag.Load() > 0 && appended > 0 {
		l.startApplier(req.Shard)
	}
	return ans, code, err
}

// startApplier runs applyLater for shard unless it runs already.
func (l *Ledger) startApplier(shard int) {
	if _, running := l.applying.LoadOrStore(shard, true); !running {
		go func() {
			defer l.applying.Delete(shard)
			l.applyLater(shard)
		}()
	}
}

// applyLater applies a lagging standby's log, one entry per ApplyDelay.
func (l *Ledger) applyLater(shard int) {
	for {
		// Wait out the delay, reading it again as it goes: a delay turned
		// off catches up at once.
		for waited := time.Duration(0); waited < time.Duration(l.applyLag.Load()); {
			step := min(time.Duration(l.applyLag.Load())-waited, 50*time.Millisecond)
			time.Sleep(step)
			waited += step
		}
		more := false
		_ = l.st.update(shard, func(t shardTx) error {
			m, _ := t.meta()
			if m.Applied >= m.Received {
				return nil
			}
			if err := t.applyUpTo(&m, m.Applied+1); err != nil {
				return err
			}
			more = m.Applied < m.Received
			return t.putMeta(m)
		})
		if !more {
			return
		}
	}
}

// balance reads a user's balance on the primary at epoch.
func (l *Ledger) balance(shard int, epoch uint64, user string) (int64, error) {
	mu := l.lock(shard)
	mu.Lock()
	defer mu.Unlock()
	var bal int64
	settled := false
	err := l.st.view(shard, func(t shardTx) error {
		if m, ok := t.meta(); ok && m.Role == RolePrimary && m.Epoch == epoch {
			bal, settled = t.balance(user), true
		}
		return nil
	})
	if err != nil || settled {
		return bal, err
	}
	err = l.st.update(shard, func(t shardTx) error {
		if _, err := l.owner(t, epoch); err != nil {
			return err
		}
		bal = t.balance(user)
		return nil
	})
	return bal, err
}
