package ledger

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	bolt "go.etcd.io/bbolt"
)

// Roles of this unit for a shard.
const (
	RolePrimary = "primary"
	RoleStandby = "standby"
)

// Op is one write, as the log holds it.
type Op struct {
	// ID is the idempotency key: an op whose ID was applied before is not
	// applied again; its first result is returned.
	ID string `json:"id"`
	// Kind is deposit (Amount onto User), debit (Amount off User, if the
	// balance covers it: the first half of a transfer) or credit (Amount
	// onto User: the second half, applied at the receiver's home).
	Kind   string `json:"kind"`
	User   string `json:"user"`
	Amount int64  `json:"amount"`
	// To is a debit's receiver (for the record).
	To string `json:"to,omitempty"`
}

// Result is what applying an op gave.
type Result struct {
	OK      bool   `json:"ok"`
	Balance int64  `json:"balance"`
	Error   string `json:"error,omitempty"` // "insufficient funds"
	// Request is the fingerprint of the op that made it: a key reused
	// for another request is refused.
	Request string `json:"request,omitempty"`
}

// fingerprint names what an op asks, to tell a retry from a reused key.
func (op Op) fingerprint() string {
	return fmt.Sprintf("%s %s %d %s", op.Kind, op.User, op.Amount, op.To)
}

// Entry is an op at a log position, with the epoch of the primary that
// appended it.
type Entry struct {
	Seq   uint64 `json:"seq"`
	Epoch uint64 `json:"epoch"`
	Op    Op     `json:"op"`
}

// shardMeta is a shard's replication state on this unit.
type shardMeta struct {
	Epoch uint64 `json:"epoch"` // the highest epoch seen
	Role  string `json:"role"`
	// Received is the end of the log held (durable); Applied the end of
	// what the accounts reflect. Committed, on a primary, is the end of
	// what a standby acknowledged (and so what clients were answered); on
	// a standby, the primary's committed as its last message said.
	Received  uint64 `json:"received"`
	Applied   uint64 `json:"applied"`
	Committed uint64 `json:"committed"`
	// PrimaryEpoch, on a standby, is the epoch of the primary it last
	// heard from: its Committed is that primary's word.
	PrimaryEpoch uint64 `json:"primary_epoch"`
}

// sync reports whether this replica holds every write its shard's
// primary committed: a primary, by construction (it commits only what its
// standby holds); a standby, when it has heard from the primary of the
// current epoch and holds all that primary said it committed.
func (m shardMeta) sync() bool {
	if m.Role == RolePrimary {
		return true
	}
	return m.PrimaryEpoch == m.Epoch && m.Epoch > 0 && m.Received >= m.Committed
}

// store is the ledger's disk: per shard a meta record, the log, the
// accounts and the results by idempotency key, in one bbolt file.
type store struct{ db *bolt.DB }

var bucketMeta = []byte("meta")

func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		return nil, fmt.Errorf("ledger data %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketMeta)
		return err
	}); err != nil {
		db.Close()
		return nil, err
	}
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

func seqKey(seq uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], seq)
	return b[:]
}

func bucketName(kind string, shard int) []byte { return []byte(kind + "/" + strconv.Itoa(shard)) }

// shardTx is one shard's buckets in a transaction.
type shardTx struct {
	tx    *bolt.Tx
	shard int
}

func (t shardTx) bucket(kind string) *bolt.Bucket {
	if t.tx.Writable() {
		b, _ := t.tx.CreateBucketIfNotExists(bucketName(kind, t.shard))
		return b
	}
	return t.tx.Bucket(bucketName(kind, t.shard))
}

func (t shardTx) meta() (shardMeta, bool) {
	var m shardMeta
	v := t.tx.Bucket(bucketMeta).Get([]byte(strconv.Itoa(t.shard)))
	if v == nil {
		return m, false
	}
	_ = json.Unmarshal(v, &m)
	return m, true
}

func (t shardTx) putMeta(m shardMeta) error {
	v, _ := json.Marshal(m)
	return t.tx.Bucket(bucketMeta).Put([]byte(strconv.Itoa(t.shard)), v)
}

func (t shardTx) entry(seq uint64) (Entry, bool) {
	b := t.bucket("log")
	if b == nil {
		return Entry{}, false
	}
	v := b.Get(seqKey(seq))
	if v == nil {
		return Entry{}, false
	}
	var e Entry
	_ = json.Unmarshal(v, &e)
	return e, true
}

func (t shardTx) putEntry(e Entry) error {
	v, _ := json.Marshal(e)
	return t.bucket("log").Put(seqKey(e.Seq), v)
}

// truncate drops the log from seq on (entries never applied here).
func (t shardTx) truncate(seq uint64) error {
	b := t.bucket("log")
	c := b.Cursor()
	for k, _ := c.Seek(seqKey(seq)); k != nil; k, _ = c.Next() {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

func (t shardTx) balance(user string) int64 {
	b := t.bucket("acct")
	if b == nil {
		return 0
	}
	v := b.Get([]byte(user))
	if v == nil {
		return 0
	}
	n, _ := strconv.ParseInt(string(v), 10, 64)
	return n
}

func (t shardTx) result(id string) (Result, bool) {
	b := t.bucket("idem")
	if b == nil || id == "" {
		return Result{}, false
	}
	v := b.Get([]byte(id))
	if v == nil {
		return Result{}, false
	}
	var r Result
	_ = json.Unmarshal(v, &r)
	return r, true
}

// apply applies an op to the accounts, once per ID, and records its
// result: the same log gives the same accounts and results everywhere.
func (t shardTx) apply(op Op) (Result, error) {
	if r, ok := t.result(op.ID); ok {
		return r, nil
	}
	bal := t.balance(op.User)
	r := Result{OK: true, Request: op.fingerprint()}
	switch op.Kind {
	case "deposit", "credit":
		bal += op.Amount
	case "debit":
		if bal < op.Amount {
			r = Result{OK: false, Error: "insufficient funds", Request: op.fingerprint()}
		} else {
			bal -= op.Amount
		}
	default:
		return Result{}, fmt.Errorf("unknown op kind %q", op.Kind)
	}
	r.Balance = bal
	if err := t.bucket("acct").Put([]byte(op.User), []byte(strconv.FormatInt(bal, 10))); err != nil {
		return Result{}, err
	}
	if op.ID != "" {
		v, _ := json.Marshal(r)
		if err := t.bucket("idem").Put([]byte(op.ID), v); err != nil {
			return Result{}, err
		}
	}
	return r, nil
}

// applyUpTo applies the log from meta.Applied+1 to upTo.
func (t shardTx) applyUpTo(m *shardMeta, upTo uint64) error {
	for m.Applied < upTo {
		e, ok := t.entry(m.Applied + 1)
		if !ok {
			return fmt.Errorf("shard %d: log entry %d missing", t.shard, m.Applied+1)
		}
		if _, err := t.apply(e.Op); err != nil {
			return err
		}
		m.Applied++
	}
	return nil
}

// shards lists the shards with a meta record.
func (s *store) shards() (map[int]shardMeta, error) {
	out := map[int]shardMeta{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).ForEach(func(k, v []byte) error {
			n, err := strconv.Atoi(string(k))
			if err != nil {
				return nil
			}
			var m shardMeta
			if err := json.Unmarshal(v, &m); err != nil {
				return err
			}
			out[n] = m
			return nil
		})
	})
	return out, err
}

func (s *store) view(shard int, f func(shardTx) error) error {
	return s.db.View(func(tx *bolt.Tx) error { return f(shardTx{tx, shard}) })
}

func (s *store) update(shard int, f func(shardTx) error) error {
	return s.db.Update(func(tx *bolt.Tx) error { return f(shardTx{tx, shard}) })
}

var (
	errStaleEpoch = errors.New("stale epoch")
	errKeyReused  = errors.New("idempotency key reused")
	errNoMap      = errors.New("no shard map from the sidecar yet")
)
