// Package store is the control plane's replicated state: the topology with
// every shard's assignment and epoch, and the log of operator actions, kept
// in hashicorp/raft with its log on disk (raft-wal) and snapshots beside it.
//
// Every change is a Command applied through raft on the leader; the state
// machine checks it against the current state (routing.Compile and
// routing.ShardMap.CheckSuccessor, an epoch compare-and-set for moves) so a
// refused command changes nothing on any replica. It must not serve xDS or
// HTTP: the control plane's other parts read Map and call Apply.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftwal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
)

// Config configures a Store. The zero value of a field means its default.
type Config struct {
	// ID names this replica in the raft configuration, required.
	ID string
	// Dir holds the raft log, its stable state and snapshots, required.
	Dir string
	// Bind is the raft transport's TCP address, required (ip:port).
	Bind string
	// Bootstrap starts a new cluster with Voters (or this replica alone)
	// when Dir holds no state yet; a replica with state ignores it.
	Bootstrap bool
	// Voters are the replicas of a new cluster, this one included.
	Voters []Voter
	// Fast shortens raft's timeouts for tests on one machine.
	Fast bool
	// Logger gets the store's logs; nil discards them.
	Logger *slog.Logger
}

// Voter is one replica of the raft configuration.
type Voter struct {
	ID   string `json:"id"`
	Addr string `json:"addr"`
}

// Store is one replica of the control plane's state.
type Store struct {
	cfg   Config
	log   *slog.Logger
	raft  *raft.Raft
	fsm   *fsm
	wal   *raftwal.WAL
	meta  *metadb.BoltMetaDB
	trans *raft.NetworkTransport
	once  sync.Once
}

// ErrNotLeader: writes go to the leader; Leader says where it is (empty
// when none is known, as in a minority partition).
type ErrNotLeader struct{ Leader, LeaderID string }

func (e *ErrNotLeader) Error() string {
	if e.Leader == "" {
		return "not the raft leader and no leader is known (no quorum?): retry later"
	}
	return fmt.Sprintf("not the raft leader: send writes to %s (%s)", e.LeaderID, e.Leader)
}

// Open starts a replica from its directory, bootstrapping a new cluster
// when asked and the directory is empty.
func Open(cfg Config) (*Store, error) {
	if cfg.ID == "" || cfg.Dir == "" || cfg.Bind == "" {
		return nil, errors.New("store: id, dir and bind are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Store{cfg: cfg, log: cfg.Logger.With("component", "store", "replica", cfg.ID), fsm: &fsm{}}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "wal"), 0o700); err != nil {
		return nil, fmt.Errorf("store: data dir %s: %w", cfg.Dir, err)
	}
	// raft-wal's Close leaves its metadata database open (and locked), so
	// the store owns it and closes it after the log.
	s.meta = &metadb.BoltMetaDB{}
	wal, err := raftwal.Open(filepath.Join(cfg.Dir, "wal"), raftwal.WithMetaStore(s.meta))
	if err != nil {
		s.meta.Close()
		return nil, fmt.Errorf("store: open the raft log in %s: %w", cfg.Dir, err)
	}
	s.wal = wal
	snaps, err := raft.NewFileSnapshotStore(cfg.Dir, 3, io.Discard)
	if err != nil {
		s.closeStores()
		return nil, fmt.Errorf("store: snapshots in %s: %w", cfg.Dir, err)
	}
	addr, err := net.ResolveTCPAddr("tcp", cfg.Bind)
	if err != nil {
		s.closeStores()
		return nil, fmt.Errorf("store: bind address %q: %w", cfg.Bind, err)
	}
	trans, err := raft.NewTCPTransport(cfg.Bind, addr, 3, 5*time.Second, io.Discard)
	if err != nil {
		s.closeStores()
		return nil, fmt.Errorf("store: raft transport on %s: %w", cfg.Bind, err)
	}
	s.trans = trans
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = hclog.NewNullLogger()
	rc.SnapshotThreshold = 1024
	if cfg.Fast {
		rc.HeartbeatTimeout = 200 * time.Millisecond
		rc.ElectionTimeout = 200 * time.Millisecond
		rc.LeaderLeaseTimeout = 100 * time.Millisecond
		rc.CommitTimeout = 5 * time.Millisecond
	}
	has, err := raft.HasExistingState(wal, wal, snaps)
	if err != nil {
		s.closeStores()
		return nil, fmt.Errorf("store: read %s: %w", cfg.Dir, err)
	}
	if !has && cfg.Bootstrap {
		voters := cfg.Voters
		if len(voters) == 0 {
			voters = []Voter{{ID: cfg.ID, Addr: string(trans.LocalAddr())}}
		}
		var conf raft.Configuration
		for _, v := range voters {
			conf.Servers = append(conf.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(v.ID), Address: raft.ServerAddress(v.Addr)})
		}
		if err := raft.BootstrapCluster(rc, wal, wal, snaps, trans, conf); err != nil {
			s.closeStores()
			return nil, fmt.Errorf("store: bootstrap: %w", err)
		}
	}
	r, err := raft.NewRaft(rc, s.fsm, wal, wal, snaps, trans)
	if err != nil {
		s.closeStores()
		return nil, fmt.Errorf("store: start raft: %w", err)
	}
	s.raft = r
	return s, nil
}

func (s *Store) closeStores() {
	if s.trans != nil {
		s.trans.Close()
	}
	s.wal.Close()
	s.meta.Close()
}

// Close stops the replica; its state stays on disk.
func (s *Store) Close() error {
	var err error
	s.once.Do(func() {
		err = s.raft.Shutdown().Error()
		s.closeStores()
	})
	return err
}

// Addr is the raft transport's address.
func (s *Store) Addr() string { return string(s.trans.LocalAddr()) }

// Leader returns the leader's raft address and ID, empty when unknown.
func (s *Store) Leader() (addr, id string) {
	a, i := s.raft.LeaderWithID()
	return string(a), string(i)
}

// IsLeader reports whether this replica leads.
func (s *Store) IsLeader() bool { return s.raft.State() == raft.Leader }

// Map returns the current shard map, nil before the first topology.
func (s *Store) Map() *routing.ShardMap { return s.fsm.cur.Load() }

// Actions returns the operator actions, oldest first.
func (s *Store) Actions() []Action { return s.fsm.actions() }

// AppliedIndex is the raft index of the last applied command.
func (s *Store) AppliedIndex() uint64 { return s.raft.AppliedIndex() }

// Apply commits cmd through raft and returns the map it produced. It
// fails with *ErrNotLeader on a follower, and with *RefusedError when the
// state machine refused the command (nothing changed anywhere).
func (s *Store) Apply(ctx context.Context, cmd Command) (*routing.ShardMap, error) {
	if s.raft.State() != raft.Leader {
		a, id := s.Leader()
		return nil, &ErrNotLeader{Leader: a, LeaderID: id}
	}
	data, err := json.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("store: encode command: %w", err)
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		if timeout = time.Until(dl); timeout <= 0 {
			return nil, fmt.Errorf("store: %w", context.DeadlineExceeded)
		}
	}
	f := s.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			a, id := s.Leader()
			return nil, &ErrNotLeader{Leader: a, LeaderID: id}
		}
		return nil, fmt.Errorf("store: commit: %w", err)
	}
	switch r := f.Response().(type) {
	case error:
		return nil, r
	case *routing.ShardMap:
		return r, nil
	}
	return nil, fmt.Errorf("store: unexpected result %T", f.Response())
}

// AddVoter adds a replica to the raft configuration (on the leader).
func (s *Store) AddVoter(id, addr string) error {
	return s.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, 10*time.Second).Error()
}

// RemoveServer removes a replica from the raft configuration (on the leader).
func (s *Store) RemoveServer(id string) error {
	return s.raft.RemoveServer(raft.ServerID(id), 0, 10*time.Second).Error()
}

// Snapshot takes a snapshot now, so the log can be compacted.
func (s *Store) Snapshot() error { return s.raft.Snapshot().Error() }
