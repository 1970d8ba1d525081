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

	standbys atomic.Pointer[map[int][]string] // shard -> standby units, from the sidecar's map
	applyLag atomic.Int64                     // ApplyDelay, changeable at run time (nanoseconds)
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
	empty := map[int][]string{}
	l.standbys.Store(&empty)
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
		l.notifyStandbys(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refreshMap reads each shard's standbys from the sidecar's /config.
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
				Standbys []string `json:"standbys"`
			} `json:"assignments"`
		} `json:"topology"`
	}
	if json.NewDecoder(resp.Body).Decode(&st) != nil || st.Topology == nil {
		return
	}
	m := map[int][]string{}
	for _, a := range st.Topology.Assignments {
		m[a.Shard] = a.Standbys
	}
	l.standbys.Store(&m)
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
		_ = l.replicate(ctx, shard, m)
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
		// A primary is in sync when its standby has all it committed; a
		// standby, when it has all the primary said it committed.
		r.Sync = m.Received >= m.Committed
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
// acknowledged.
var errNotReplicated = errors.New("not replicated")

// write appends op to the shard's log at epoch, replicates it to the
// standby, then applies it: the answer comes only once the standby holds
// it. A write whose op ID was applied returns its first result.
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
			if e, ok := t.entry(s); ok && e.Op.ID == op.ID && op.ID != "" {
				return nil
			}
		}
		m.Received++
		if err := t.putEntry(Entry{Seq: m.Received, Epoch: epoch, Op: op}); err != nil {
			return err
		}
		return t.putMeta(m)
	})
	if err != nil || done != nil {
		if done != nil {
			l.m.idempotent.Inc()
			return *done, nil
		}
		return Result{}, err
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

// replicateRequest is the body of POST /.well-known/cellmesh/replicate.
type replicateRequest struct {
	Shard     int     `json:"shard"`
	Epoch     uint64  `json:"epoch"`
	Committed uint64  `json:"committed"`
	Entries   []Entry `json:"entries"`
}

type replicateAnswer struct {
	Received uint64 `json:"received"`
	Epoch    uint64 `json:"epoch"`
	Error    string `json:"error,omitempty"`
}

// maxBatch bounds the entries sent at once (a standby catching up).
const maxBatch = 256

// replicate sends the standby the entries it lacks up to m.Received, with
// the committed end, until it holds them all. The shard's lock is held.
func (l *Ledger) replicate(ctx context.Context, shard int, m shardMeta) error {
	sb := (*l.standbys.Load())[shard]
	if len(sb) == 0 {
		return nil // no standby declared: a single copy
	}
	standby := sb[0]
	from := m.Received // the standby most often has all but the newest
	if m.Received == 0 {
		from = 1
	}
	for range 64 {
		var entries []Entry
		if err := l.st.view(shard, func(t shardTx) error {
			for s := from; s <= m.Received && len(entries) < maxBatch; s++ {
				e, ok := t.entry(s)
				if !ok {
					return fmt.Errorf("shard %d: log entry %d missing", shard, s)
				}
				entries = append(entries, e)
			}
			return nil
		}); err != nil {
			return err
		}
		ans, err := l.send(ctx, standby, replicateRequest{Shard: shard, Epoch: m.Epoch, Committed: m.Committed, Entries: entries})
		if err != nil {
			l.m.replication.WithLabelValues("failed").Inc()
			return fmt.Errorf("%w: standby %s: %v", errNotReplicated, standby, err)
		}
		if ans.Epoch > m.Epoch {
			return fmt.Errorf("%w: standby %s has seen epoch %d", errStaleEpoch, standby, ans.Epoch)
		}
		if ans.Received >= m.Received {
			l.m.replication.WithLabelValues("ok").Inc()
			return nil
		}
		from = ans.Received + 1 // the standby is behind: send what it lacks
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
	switch resp.StatusCode {
	case http.StatusOK, http.StatusConflict:
		return ans, nil
	}
	return ans, fmt.Errorf("HTTP %d: %s", resp.StatusCode, ans.Error)
}

// receive takes a batch from the primary: refused below the epoch seen;
// entries it holds are skipped, a gap is answered with what it holds, and
// an unapplied tail of an older epoch that the new primary's log replaces
// is dropped.
func (l *Ledger) receive(req replicateRequest) (replicateAnswer, int, error) {
	mu := l.lock(req.Shard)
	mu.Lock()
	defer mu.Unlock()
	var ans replicateAnswer
	code := http.StatusOK
	var appended []Entry
	err := l.st.update(req.Shard, func(t shardTx) error {
		m, _ := t.meta()
		ans.Epoch = m.Epoch
		if req.Epoch < m.Epoch {
			code = http.StatusConflict
			ans.Received, ans.Error = m.Received, fmt.Sprintf("stale epoch %d: this unit has seen epoch %d", req.Epoch, m.Epoch)
			return nil
		}
		if req.Epoch > m.Epoch || m.Role == "" {
			m.Epoch, m.Role = req.Epoch, RoleStandby
		} else if m.Role == RolePrimary {
			code = http.StatusConflict
			ans.Received, ans.Error = m.Received, fmt.Sprintf("this unit is the primary at epoch %d", m.Epoch)
			return nil
		}
		for _, e := range req.Entries {
			if e.Seq <= m.Received {
				if have, ok := t.entry(e.Seq); ok && have.Op.ID == e.Op.ID && have.Epoch == e.Epoch {
					continue
				}
				if e.Seq <= m.Applied {
					return fmt.Errorf("shard %d: entry %d differs from the applied one", req.Shard, e.Seq)
				}
				if err := t.truncate(e.Seq); err != nil {
					return err
				}
				m.Received = e.Seq - 1
			}
			if e.Seq != m.Received+1 {
				break // a gap: answered with what is held
			}
			if err := t.putEntry(e); err != nil {
				return err
			}
			m.Received = e.Seq
			appended = append(appended, e)
		}
		m.Committed = max(m.Committed, min(req.Committed, m.Received))
		ans.Epoch, ans.Received = m.Epoch, m.Received
		if l.applyLag.Load() == 0 {
			if err := t.applyUpTo(&m, m.Received); err != nil {
				return err
			}
		}
		return t.putMeta(m)
	})
	if err == nil && len(appended) > 0 && l.applyLag.Load() > 0 {
		go l.applyLater(req.Shard)
	}
	return ans, code, err
}

// applyLater applies a lagging standby's log, one entry per ApplyDelay.
func (l *Ledger) applyLater(shard int) {
	for {
		time.Sleep(time.Duration(l.applyLag.Load()))
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
