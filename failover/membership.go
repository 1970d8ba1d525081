package failover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Config configures this process's membership of the gossip pool. The zero
// value of a field means its default.
type Config struct {
	// Name is the member's name, unique in the pool and the same across
	// restarts of the same member (a restarted member refutes its own
	// death). Default: MemberName(Meta).
	Name string
	// Meta is what the member tells the pool about itself, required.
	Meta Meta
	// Bind is the gossip address (ip:port, UDP and TCP), required; port 0
	// picks one (see Addr).
	Bind string
	// Advertise is the address other members reach, when not Bind.
	Advertise string
	// Join lists gossip addresses of members to join through (the
	// control-plane replicas, typically). Run retries them until one
	// answers, and joins again any that is not an alive member, so a
	// healed partition merges again.
	Join []string
	// Profile names the timings; default ProfileLAN.
	Profile Profile
	// Keys is the gossip keyring (16, 24 or 32 bytes each, AES-GCM): the
	// first encrypts, all decrypt. Required unless Insecure is set.
	Keys [][]byte
	// Insecure allows gossip in clear text (a development machine).
	Insecure bool
	// Observer gets every change of a member, self included. Required.
	Observer Observer
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// An Observer hears of member changes. Observe must not block: it runs on
// memberlist's goroutines, holding its locks.
type Observer interface {
	Observe(now time.Time, m Member)
}

// MemberName is the default name of a member: role, unit or region, service
// and address, so two sidecars never share one and a restart keeps it.
func MemberName(m Meta) string {
	switch m.Role {
	case RoleSidecar:
		return m.Role + "/" + m.Unit + "/" + m.Service + "/" + m.Address
	}
	return m.Role + "/" + m.Region + "/" + m.Address
}

// Membership is this process's member of the gossip pool.
type Membership struct {
	cfg  Config
	log  *slog.Logger
	ml   *memberlist.Memberlist
	keys *memberlist.Keyring
	dlg  *delegate
	// interval is how often Run looks for seeds to join again.
	interval time.Duration

	mu      sync.Mutex
	leaving map[string]bool // members that said they are leaving
	closed  bool
	meta    Meta
}

// ConfigError lists every problem of a Config.
type ConfigError struct{ Problems []string }

func (e *ConfigError) Error() string {
	s := "gossip configuration:"
	for _, p := range e.Problems {
		s += " " + p + ";"
	}
	return s[:len(s)-1]
}

// Start checks cfg, binds the gossip address and starts gossiping (alone
// until Run joins the seeds).
func Start(cfg Config) (*Membership, error) {
	var problems []string
	if err := cfg.Meta.validate(); err != nil {
		problems = append(problems, err.Error())
	}
	bindIP, bindPort, err := splitAddr(cfg.Bind)
	if err != nil {
		problems = append(problems, fmt.Sprintf("gossip bind address %q: want ip:port", cfg.Bind))
	}
	var advIP string
	var advPort int
	if cfg.Advertise != "" {
		if advIP, advPort, err = splitAddr(cfg.Advertise); err != nil {
			problems = append(problems, fmt.Sprintf("gossip advertise address %q: want ip:port", cfg.Advertise))
		}
	}
	for _, j := range cfg.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			problems = append(problems, fmt.Sprintf("gossip join address %q: want host:port", j))
		}
	}
	if _, err := ParseProfile(string(cfg.Profile)); err != nil {
		problems = append(problems, err.Error())
	}
	if len(cfg.Keys) == 0 && !cfg.Insecure {
		problems = append(problems, "no gossip key: give a key file (cellmesh gossip-key > gossip.key), or run insecure on a development machine")
	}
	for i, k := range cfg.Keys {
		if err := checkKey(k); err != nil {
			problems = append(problems, fmt.Sprintf("gossip key %d: %v", i+1, err))
		}
	}
	if cfg.Observer == nil {
		problems = append(problems, "an observer is required")
	}
	var meta []byte
	if len(problems) == 0 {
		if meta, err = cfg.Meta.encode(); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if len(problems) > 0 {
		return nil, &ConfigError{Problems: problems}
	}
	if cfg.Profile == "" {
		cfg.Profile = ProfileLAN
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Join = slices.Clone(cfg.Join)
	cfg.Keys = slices.Clone(cfg.Keys)
	if cfg.Name == "" {
		cfg.Name = MemberName(cfg.Meta)
	}
	ms := &Membership{cfg: cfg, log: cfg.Logger.With("component", "gossip", "member", cfg.Name), leaving: map[string]bool{}, meta: cfg.Meta}
	mc := cfg.Profile.config()
	mc.Name = cfg.Name
	mc.BindAddr, mc.BindPort = bindIP, bindPort
	if advIP != "" {
		mc.AdvertiseAddr, mc.AdvertisePort = advIP, advPort
	}
	ms.dlg = &delegate{ms: ms, meta: meta}
	mc.Delegate = ms.dlg
	mc.Events = &events{ms: ms}
	mc.Logger = log.New(&logWriter{log: ms.log}, "", 0)
	if len(cfg.Keys) > 0 {
		if ms.keys, err = memberlist.NewKeyring(cfg.Keys, cfg.Keys[0]); err != nil {
			return nil, fmt.Errorf("gossip keyring: %w", err)
		}
		mc.Keyring = ms.keys
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	ms.interval = max(mc.ProbeInterval, 100*time.Millisecond)
	if ms.ml, err = memberlist.Create(mc); err != nil {
		return nil, fmt.Errorf("gossip on %s: %w", cfg.Bind, err)
	}
	return ms, nil
}

func splitAddr(s string) (string, int, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return "", 0, err
	}
	return ap.Addr().String(), int(ap.Port()), nil
}

func checkKey(k []byte) error {
	switch len(k) {
	case 16, 24, 32:
		return nil
	}
	return fmt.Errorf("%d bytes: want 16, 24 or 32 (AES-128, -192 or -256)", len(k))
}

// Name is the member's name in the pool.
func (ms *Membership) Name() string { return ms.cfg.Name }

// Addr is the gossip address other members reach (the bound port when Bind
// asked for port 0).
func (ms *Membership) Addr() string {
	n := ms.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Run joins the seeds, retrying until one answers, then joins again any
// seed that is not an alive member. When ctx ends it
// leaves the pool (the others see "left", not "dead") and stops.
func (ms *Membership) Run(ctx context.Context) error {
	t := time.NewTicker(ms.interval)
	defer t.Stop()
	var lastJoin time.Time
	joined := len(ms.cfg.Join) == 0
	for {
		if wait := rejoinEvery; !joined || time.Since(lastJoin) >= wait {
			lastJoin = time.Now()
			if n, err := ms.joinMissing(); err != nil && !joined {
				ms.log.Warn("no gossip seed answered yet; retrying", "seeds", ms.cfg.Join, "error", err)
			} else if n > 0 || !joined {
				joined = true
				ms.log.Info("joined the gossip pool", "through", n, "members", ms.ml.NumMembers())
			}
		}
		select {
		case <-ctx.Done():
			return ms.Close()
		case <-t.C:
		}
	}
}

// rejoinEvery is how often Run joins seeds that are not alive members.
const rejoinEvery = 5 * time.Second

// joinMissing joins the seeds that are not alive members; it returns how
// many answered.
func (ms *Membership) joinMissing() (int, error) {
	alive := map[string]bool{}
	for _, n := range ms.ml.Members() {
		if n.State == memberlist.StateAlive && n.Name != ms.cfg.Name {
			alive[net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))] = true
		}
	}
	self := ms.Addr()
	var missing []string
	for _, j := range ms.cfg.Join {
		if j != self && j != ms.cfg.Bind && !alive[j] {
			missing = append(missing, j)
		}
	}
	if len(missing) == 0 {
		return 0, nil
	}
	return ms.ml.Join(missing)
}

// SetKeys replaces the keyring: the keys not held yet are installed, the
// first becomes the one that encrypts, the others held are removed. A
// rotation sets [old, new] on every member (install), then [new, old]
// (switch), then [new] (remove); each step waits until every member has
// taken the one before.
func (ms *Membership) SetKeys(keys [][]byte) error {
	if ms.keys == nil {
		return errors.New("gossip runs in clear text: keys are set at start")
	}
	if len(keys) == 0 {
		return errors.New("a keyring needs at least one key")
	}
	for i, k := range keys {
		if err := checkKey(k); err != nil {
			return fmt.Errorf("gossip key %d: %w", i+1, err)
		}
	}
	for _, k := range keys {
		if err := ms.keys.AddKey(k); err != nil {
			return err
		}
	}
	if err := ms.keys.UseKey(keys[0]); err != nil {
		return err
	}
	for _, k := range ms.keys.GetKeys() {
		if !slices.ContainsFunc(keys, func(o []byte) bool { return bytes.Equal(o, k) }) {
			if err := ms.keys.RemoveKey(k); err != nil {
				return err
			}
		}
	}
	ms.log.Info("gossip keyring replaced", "keys", len(keys))
	return nil
}

// Close leaves the pool, telling the others, and stops gossiping. It is
// idempotent.
func (ms *Membership) Close() error {
	ms.mu.Lock()
	if ms.closed {
		ms.mu.Unlock()
		return nil
	}
	ms.closed = true
	meta := ms.meta
	ms.mu.Unlock()
	// Say "leaving" first, so the others count the loss as a leave: to
	// the control-plane replicas (whose view failover acts on) in a
	// reliable message each, which lands before the leave can; to the
	// rest in the metadata, which gossip may deliver after the leave (they
	// may then see a death).
	meta.Leaving = true
	if b, err := meta.encode(); err == nil {
		ms.dlg.set(b)
		if err := ms.ml.UpdateNode(time.Second); err != nil {
			ms.log.Warn("could not tell the pool this member is leaving; it may be seen dead", "error", err)
		}
	}
	msg := append([]byte{msgLeaving}, ms.cfg.Name...)
	for _, n := range ms.ml.Members() {
		if n.Name == ms.cfg.Name {
			continue
		}
		if m, err := decodeMeta(n.Meta); err != nil || m.Role != RoleControlPlane {
			continue
		}
		if err := ms.ml.SendReliable(n, msg); err != nil {
			ms.log.Warn("could not tell a control-plane replica this member is leaving; it may see a death", "replica", n.Name, "error", err)
		}
	}
	if err := ms.ml.Leave(time.Second); err != nil {
		ms.log.Warn("leaving the gossip pool", "error", err)
	}
	return ms.ml.Shutdown()
}

// Kill stops gossiping without leaving: the others find the member dead,
// as after a crash (tests).
func (ms *Membership) Kill() error {
	ms.mu.Lock()
	ms.closed = true
	ms.mu.Unlock()
	return ms.ml.Shutdown()
}

func member(n *memberlist.Node, st MemberState, now time.Time) (Member, bool) {
	meta, err := decodeMeta(n.Meta)
	if err != nil {
		return Member{}, false
	}
	return Member{Name: n.Name, Meta: meta, State: st, Gossip: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))), Since: now}, true
}

// delegate gives memberlist the member's metadata and takes the one user
// message cellmesh sends: "leaving".
type delegate struct {
	ms   *Membership
	mu   sync.Mutex
	meta []byte
}

func (d *delegate) set(b []byte) {
	d.mu.Lock()
	d.meta = b
	d.mu.Unlock()
}

func (d *delegate) NodeMeta(int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.meta
}

// NotifyMsg takes a member's word that it is leaving.
func (d *delegate) NotifyMsg(b []byte) {
	if len(b) > 1 && b[0] == msgLeaving && d.ms != nil {
		d.ms.mu.Lock()
		d.ms.leaving[string(b[1:])] = true
		d.ms.mu.Unlock()
	}
}

// msgLeaving starts the user message "I am leaving", followed by the
// member's name.
const msgLeaving = 'L'

func (d *delegate) GetBroadcasts(int, int) [][]byte { return nil }
func (d *delegate) LocalState(bool) []byte          { return nil }
func (d *delegate) MergeRemoteState([]byte, bool)   {}

var _ memberlist.Delegate = (*delegate)(nil)

// events turns memberlist's node events into Member changes. Memberlist
// does not say whether a member it lost died or left (its Node.State is
// not kept up to date), so a member about to leave first says so in its
// metadata (Meta.Leaving); a loss without that word is a death.
type events struct{ ms *Membership }

var _ memberlist.EventDelegate = (*events)(nil)

func (e *events) NotifyJoin(n *memberlist.Node)   { e.notify(n, false) }
func (e *events) NotifyUpdate(n *memberlist.Node) { e.notify(n, false) }
func (e *events) NotifyLeave(n *memberlist.Node)  { e.notify(n, true) }

func (e *events) notify(n *memberlist.Node, lost bool) {
	now := time.Now()
	st := MemberAlive
	m, ok := member(n, st, now)
	if !ok {
		e.ms.log.Warn("a gossip member sent metadata that is not cellmesh's; ignored", "name", n.Name, "addr", n.Addr.String())
		return
	}
	e.ms.mu.Lock()
	if lost {
		m.State = MemberDead
		if e.ms.leaving[n.Name] || m.Meta.Leaving {
			m.State = MemberLeft
		}
		delete(e.ms.leaving, n.Name)
	} else if m.Meta.Leaving {
		e.ms.leaving[n.Name] = true
	} else {
		delete(e.ms.leaving, n.Name)
	}
	e.ms.mu.Unlock()
	m.Meta.Leaving = false
	e.ms.cfg.Observer.Observe(now, m)
}

// logLevels maps memberlist's line prefixes to slog levels (its INFO lines
// are per-probe chatter: debug here).
var logLevels = []struct {
	prefix string
	level  slog.Level
}{{"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelDebug}, {"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelError}}

// logWriter sends memberlist's log lines ("[WARN] memberlist: ...") to
// slog at their level.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for _, p := range logLevels {
		if rest, ok := strings.CutPrefix(line, p.prefix); ok {
			level, line = p.level, strings.TrimSpace(rest)
			break
		}
	}
	w.log.Log(context.Background(), level, line)
	return len(p), nil
}
