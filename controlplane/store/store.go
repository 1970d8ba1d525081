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
	"strconv"
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
	// Bind is the raft transport's TCP address, required (ip:port). When
	// its IP is a specific one, connections to other replicas leave from
	// it too.
	Bind string
	// Advertise is the address other replicas reach this one at, when it
	// is not Bind (NAT, a relay).
	Advertise string
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
	s := &Store{cfg: cfg, log: cfg.Logger.With("component", "store", "replica", cfg.ID), fsm: newFSM()}
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
	trans, err := newTransport(cfg.Bind, cfg.Advertise)
	if err != nil {
		s.closeStores()
		return nil, err
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
func (s *Store) Map() *routing.ShardMap { return s.fsm.cur.Load().Map }

// State returns the current state.
func (s *Store) State() *State { return s.fsm.cur.Load() }

// Changed receives after the state changed (one receive may stand for
// several changes). It has one reader: the part that serves the state.
func (s *Store) Changed() <-chan struct{} { return s.fsm.changed }

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

// Server is a member of the raft configuration.
type Server struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	Voter   bool   `json:"voter"`
}

// Configuration returns the raft configuration as this replica knows it.
func (s *Store) Configuration() ([]Server, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	var out []Server
	for _, sv := range f.Configuration().Servers {
		out = append(out, Server{ID: string(sv.ID), Address: string(sv.Address), Voter: sv.Suffrage == raft.Voter})
	}
	return out, nil
}

// Stats are raft's figures for metrics: its state, term, commit and
// applied indexes.
type Stats struct {
	State                       string
	Term, Commit, Applied, Last uint64
}

// LastContact is when this replica last heard from the leader (zero if
// never; the leader itself reports now).
func (s *Store) LastContact() time.Time {
	if s.IsLeader() {
		return time.Now()
	}
	return s.raft.LastContact()
}

// Stats returns raft's figures now.
func (s *Store) Stats() Stats {
	st := s.raft.Stats()
	num := func(k string) uint64 { v, _ := strconv.ParseUint(st[k], 10, 64); return v }
	return Stats{State: s.raft.State().String(), Term: num("term"), Commit: num("commit_index"), Applied: s.raft.AppliedIndex(), Last: s.raft.LastIndex()}
}

// Snapshot takes a snapshot now, so the log can be compacted.
func (s *Store) Snapshot() error { return s.raft.Snapshot().Error() }

// tcpLayer is raft's stream layer over TCP. Unlike raft's own, it dials
// from the bind IP, so a replica bound to one address of a multi-homed
// host (or of loopback, in tests) is seen coming from it.
type tcpLayer struct {
	net.Listener
	advertise net.Addr
	dialer    net.Dialer
}

func (l *tcpLayer) Addr() net.Addr { return l.advertise }

func (l *tcpLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := l.dialer
	d.Timeout = timeout
	return d.Dial("tcp", string(address))
}

func newTransport(bind, advertise string) (*raft.NetworkTransport, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("store: raft transport on %s: %w", bind, err)
	}
	l := &tcpLayer{Listener: ln, advertise: ln.Addr()}
	if advertise != "" {
		a, err := net.ResolveTCPAddr("tcp", advertise)
		if err != nil || a.IP == nil || a.IP.IsUnspecified() || a.Port == 0 {
			ln.Close()
			return nil, fmt.Errorf("store: raft advertise address %q: want a reachable ip:port", advertise)
		}
		l.advertise = a
	} else if a := ln.Addr().(*net.TCPAddr); a.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("store: raft bind address %s is unspecified: give an advertise address other replicas can reach", bind)
	}
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsUnspecified() {
		l.dialer.LocalAddr = &net.TCPAddr{IP: ip}
	}
	return raft.NewNetworkTransport(l, 3, 10*time.Second, io.Discard), nil
}
