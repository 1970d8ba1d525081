package store

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/hashicorp/raft"
)

// Ops of a Command.
const (
	// OpSetTopology replaces the topology; it must be a valid successor of
	// the current one (routing.ShardMap.CheckSuccessor).
	OpSetTopology = "set-topology"
	// OpMove makes To the primary of Shard if its epoch is still Epoch:
	// epoch+1, the old primary first among the standbys, version+1.
	OpMove = "move"
)

// Command is one change of the state, with who asked for it and when.
type Command struct {
	Op       string            `json:"op"`
	Topology *routing.Topology `json:"topology,omitempty"`
	Shard    int               `json:"shard,omitempty"`
	To       string            `json:"to,omitempty"`
	Epoch    uint64            `json:"epoch,omitempty"`
	Who      string            `json:"who"`
	At       time.Time         `json:"at"`
}

// Action is an applied command as the operator log keeps it.
type Action struct {
	Index   uint64    `json:"index"`
	At      time.Time `json:"at"`
	Who     string    `json:"who"`
	What    string    `json:"what"`
	Version uint64    `json:"version"`
}

// maxActions bounds the operator log kept in the state.
const maxActions = 1000

// RefusedError: the state machine refused a command; nothing changed.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "refused: " + e.Reason }

// fsm is the raft state machine. Apply runs on one goroutine (raft's);
// readers use cur and actions.
type fsm struct {
	cur  atomic.Pointer[routing.ShardMap]
	mu   sync.Mutex
	acts []Action
}

func (f *fsm) actions() []Action {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.acts)
}

func (f *fsm) Apply(l *raft.Log) any {
	var cmd Command
	if err := json.Unmarshal(l.Data, &cmd); err != nil {
		return &RefusedError{Reason: "undecodable command: " + err.Error()}
	}
	next, what, err := f.next(cmd)
	if err != nil {
		return err
	}
	f.cur.Store(next)
	f.mu.Lock()
	f.acts = append(f.acts, Action{Index: l.Index, At: cmd.At, Who: cmd.Who, What: what, Version: next.Version()})
	if len(f.acts) > maxActions {
		f.acts = slices.Clone(f.acts[len(f.acts)-maxActions:])
	}
	f.mu.Unlock()
	return next
}

// next computes the map a command leads to, or why it is refused.
func (f *fsm) next(cmd Command) (*routing.ShardMap, string, error) {
	cur := f.cur.Load()
	switch cmd.Op {
	case OpSetTopology:
		if cmd.Topology == nil {
			return nil, "", &RefusedError{Reason: "set-topology without a topology"}
		}
		m, err := routing.Compile(cmd.Topology)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		if cur != nil {
			if err := cur.CheckSuccessor(m); err != nil {
				return nil, "", &RefusedError{Reason: err.Error()}
			}
		}
		return m, fmt.Sprintf("set topology version %d", m.Version()), nil
	case OpMove:
		if cur == nil {
			return nil, "", &RefusedError{Reason: "no topology yet"}
		}
		owner, err := cur.Lookup(cmd.Shard)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		if owner.Epoch != cmd.Epoch {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is at epoch %d, not %d: read it again", routing.ShardName(cmd.Shard), owner.Epoch, cmd.Epoch)}
		}
		if owner.Unit == cmd.To {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is already on %s", routing.ShardName(cmd.Shard), cmd.To)}
		}
		t := cur.Topology()
		t.Version++
		for i := range t.Assignments {
			a := &t.Assignments[i]
			if a.Shard != cmd.Shard {
				continue
			}
			sb := []string{a.Primary}
			for _, u := range a.Standbys {
				if u != cmd.To && u != a.Primary {
					sb = append(sb, u)
				}
			}
			a.Primary, a.Standbys, a.Epoch = cmd.To, sb, a.Epoch+1
		}
		m, err := routing.Compile(t)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		return m, fmt.Sprintf("move %s from %s to %s, epoch %d", routing.ShardName(cmd.Shard), owner.Unit, cmd.To, owner.Epoch+1), nil
	}
	return nil, "", &RefusedError{Reason: fmt.Sprintf("unknown op %q", cmd.Op)}
}

// snapshotState is what a snapshot holds.
type snapshotState struct {
	Topology *routing.Topology `json:"topology"`
	Actions  []Action          `json:"actions"`
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	var st snapshotState
	if m := f.cur.Load(); m != nil {
		st.Topology = m.Topology()
	}
	st.Actions = f.actions()
	return &snapshot{st}, nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var st snapshotState
	if err := json.NewDecoder(rc).Decode(&st); err != nil {
		return fmt.Errorf("decode snapshot: %w", err)
	}
	var m *routing.ShardMap
	if st.Topology != nil {
		var err error
		if m, err = routing.Compile(st.Topology); err != nil {
			return fmt.Errorf("snapshot topology: %w", err)
		}
	}
	f.cur.Store(m)
	f.mu.Lock()
	f.acts = st.Actions
	f.mu.Unlock()
	return nil
}

type snapshot struct{ st snapshotState }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(s.st); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}
