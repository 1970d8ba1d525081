package failover

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// pool is gossip members of one test, each with its own Health.
type pool struct {
	t    *testing.T
	seed string
}

type node struct {
	once   sync.Once
	ms     *Membership
	h      *Health
	cancel context.CancelFunc
	done   chan error
}

func key(b byte) []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = b
	}
	return k
}

// start starts a member of unit (a sidecar) with keys, joined to the
// pool's first member; it stops at the end of the test.
func (p *pool) start(unit string, keys ...[]byte) *node {
	p.t.Helper()
	n, err := p.try(unit, freeAddr(p.t), keys...)
	if err != nil {
		p.t.Fatal(err)
	}
	return n
}

func (p *pool) try(unit, bind string, keys ...[]byte) (*node, error) {
	return p.tryAs(RoleSidecar, unit, bind, keys...)
}

// startReplica starts a member with the control-plane role in region.
func (p *pool) startReplica(region string, keys ...[]byte) *node {
	p.t.Helper()
	n, err := p.tryAs(RoleControlPlane, region+"-cp", freeAddr(p.t), keys...)
	if err != nil {
		p.t.Fatal(err)
	}
	return n
}

func (p *pool) tryAs(role, unit, bind string, keys ...[]byte) (*node, error) {
	h := NewHealth(HealthConfig{Grace: 200 * time.Millisecond})
	h.SetUnits(time.Now(), map[string]string{"us-1": "us", "us-2": "us", "eu-1": "eu"})
	region := strings.Split(unit, "-")[0]
	meta := Meta{Role: role, Region: region, Unit: unit, Service: "ledger", Address: bind}
	if role == RoleControlPlane {
		meta = Meta{Role: role, Region: region}
	}
	ms, err := Start(Config{
		Meta:    meta,
		Name:    fmt.Sprintf("%s/%s", unit, bind),
		Bind:    bind,
		Join:    nonEmpty(p.seed),
		Profile: ProfileFast,
		Keys:    keys,
		// A member observes itself and every other one.
		Observer: h,
	})
	if err != nil {
		return nil, err
	}
	if p.seed == "" {
		p.seed = ms.Addr()
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{ms: ms, h: h, cancel: cancel, done: make(chan error, 1)}
	go func() { n.done <- ms.Run(ctx) }()
	go func() {
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tk.C:
				h.Tick(now)
			}
		}
	}()
	p.t.Cleanup(n.stop)
	return n, nil
}

func (n *node) stop() {
	n.once.Do(func() {
		n.cancel()
		<-n.done
	})
}

// freeAddr returns a loopback address whose port is free for both TCP
// and UDP (gossip binds both), so a member's name can carry it.
func freeAddr(t *testing.T) string {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		u, err := net.ListenPacket("udp", addr)
		l.Close()
		if err == nil {
			u.Close()
			return addr
		}
	}
	t.Fatal("no port free for both TCP and UDP")
	return ""
}

func nonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return []string{s}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func stateOf(h *Health, name string) MemberState {
	v := h.View()
	for _, m := range v.Members {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

func allSee(ns []*node, name string, st MemberState) func() bool {
	return func() bool {
		for _, n := range ns {
			if stateOf(n.h, name) != st {
				return false
			}
		}
		return true
	}
}

func TestMembershipDetectsDeathAndLeave(t *testing.T) {
	p := &pool{t: t}
	k := key(1)
	a := p.start("us-1", k)
	b := p.start("us-1", k)
	c := p.start("us-2", k)
	d := p.start("eu-1", k)
	cp := p.startReplica("us", k)
	all := []*node{a, b, c, d, cp}
	for _, n := range all {
		waitFor(t, "every member alive everywhere", 10*time.Second, allSee(all, n.ms.Name(), MemberAlive))
	}
	// Metadata travels.
	v := a.h.View()
	for _, m := range v.Members {
		if m.Name == d.ms.Name() && (m.Meta.Unit != "eu-1" || m.Meta.Region != "eu" || m.Meta.Service != "ledger" || m.Gossip != d.ms.Addr()) {
			t.Fatalf("member %s seen as %+v", d.ms.Name(), m)
		}
	}

	// A crash: the others find the member dead, its unit degraded.
	if err := b.ms.Kill(); err != nil {
		t.Fatal(err)
	}
	rest := []*node{a, c, d, cp}
	waitFor(t, "the killed member dead everywhere", 10*time.Second, allSee(rest, b.ms.Name(), MemberDead))
	if got := c.h.View(); got.Unit("us-1").State != StateDegraded {
		t.Fatalf("us-1 with one of two members dead is %s", got.Unit("us-1").State)
	}

	// A clean stop: the control-plane replicas, whose view failover acts
	// on, are told in a reliable message and see it left, not dead. (The
	// other members learn it from gossiped metadata, which may come after
	// the loss: they may see a death.)
	d.stop()
	waitFor(t, "the stopped member left at the replica", 10*time.Second, allSee([]*node{cp}, d.ms.Name(), MemberLeft))
	waitFor(t, "the stopped member gone everywhere", 10*time.Second, func() bool {
		for _, n := range []*node{a, c} {
			if st := stateOf(n.h, d.ms.Name()); st != MemberLeft && st != MemberDead {
				return false
			}
		}
		return true
	})
	waitFor(t, "eu down (its only unit's member left)", 10*time.Second, func() bool {
		v := cp.h.View()
		return v.Region("eu").State == StateDown
	})
	for _, e := range cp.h.Events(0) {
		if e.Kind == "member" && e.Name == d.ms.Name() && e.To == string(MemberDead) {
			t.Fatalf("a member that left was seen dead by a replica: %+v", e)
		}
	}
}

func TestMembershipRestartRefutesDeath(t *testing.T) {
	p := &pool{t: t}
	k := key(2)
	a := p.start("us-1", k)
	b := p.start("us-2", k)
	waitFor(t, "b alive at a", 10*time.Second, allSee([]*node{a}, b.ms.Name(), MemberAlive))
	name, addr := b.ms.Name(), b.ms.Addr()
	b.ms.Kill()
	b.cancel()
	waitFor(t, "b dead at a", 10*time.Second, allSee([]*node{a}, name, MemberDead))
	// The same member comes back on the same address: its death is
	// refuted and it is alive again (held down for a while: it died).
	var b2 *node
	waitFor(t, "b restarted on its address", 10*time.Second, func() bool {
		n, err := p.try("us-2", addr, k)
		if err != nil {
			return false // the port may not be free again yet
		}
		b2 = n
		return true
	})
	if b2.ms.Name() != name {
		t.Fatalf("restarted member named %s, want %s", b2.ms.Name(), name)
	}
	waitFor(t, "b alive again at a", 10*time.Second, allSee([]*node{a}, name, MemberAlive))
	v := a.h.View()
	for _, m := range v.Members {
		if m.Name == name && (m.HeldUntil.IsZero() || m.Up) {
			t.Fatalf("a member back from the dead is not held down: %+v", m)
		}
	}
}

func TestMembershipKeyRotation(t *testing.T) {
	p := &pool{t: t}
	old, next := key(3), key(4)
	ns := []*node{p.start("us-1", old), p.start("us-2", old), p.start("eu-1", old)}
	for _, n := range ns {
		waitFor(t, "every member alive", 10*time.Second, allSee(ns, n.ms.Name(), MemberAlive))
	}
	// Each step goes to every member before the next; the pool stays
	// whole throughout.
	for _, step := range []struct {
		name string
		keys [][]byte
	}{
		{"install", [][]byte{old, next}},
		{"switch", [][]byte{next, old}},
		{"remove", [][]byte{next}},
	} {
		for _, n := range ns {
			if err := n.ms.SetKeys(step.keys); err != nil {
				t.Fatalf("%s: %v", step.name, err)
			}
		}
		// Long enough for several probe rounds of every member.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) {
			for _, n := range ns {
				if got := stateOf(ns[0].h, n.ms.Name()); got != MemberAlive {
					t.Fatalf("after %s: %s is %s", step.name, n.ms.Name(), got)
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// A member with the new key joins; one with only the old key cannot.
	p.seed = ns[0].ms.Addr()
	fresh := p.start("us-1", next)
	waitFor(t, "a member with the new key joins", 10*time.Second, allSee(ns, fresh.ms.Name(), MemberAlive))
	stale := p.start("us-2", old)
	time.Sleep(time.Second) // a negative: give it time to fail to join
	if st := stateOf(ns[0].h, stale.ms.Name()); st != "" {
		t.Fatalf("a member with only the removed key got in: %s", st)
	}
	for _, e := range ns[0].h.Events(0) {
		if e.To == string(MemberDead) {
			t.Fatalf("a member died during the rotation: %+v", e)
		}
	}
}

func TestStartRefusesBadConfig(t *testing.T) {
	_, err := Start(Config{Meta: Meta{Role: "router", Region: ""}, Bind: "nowhere", Join: []string{"x"}, Profile: "slow", Keys: [][]byte{[]byte("short")}})
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("err = %v, want a ConfigError", err)
	}
	for _, want := range []string{`role "router"`, `bind address "nowhere"`, `join address "x"`, `profile "slow"`, "gossip key 1: 5 bytes", "an observer is required"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if _, err := Start(Config{Meta: Meta{Role: RoleSidecar, Region: "us", Unit: "us-1", Service: "s"}, Bind: "127.0.0.1:0", Observer: NewHealth(HealthConfig{})}); err == nil || !strings.Contains(err.Error(), "no gossip key") {
		t.Fatalf("clear-text gossip without Insecure: %v", err)
	}
	long := Meta{Role: RoleSidecar, Region: "us", Unit: "us-1", Service: strings.Repeat("s", 600)}
	if _, err := Start(Config{Meta: long, Bind: "127.0.0.1:0", Insecure: true, Observer: NewHealth(HealthConfig{})}); err == nil || !strings.Contains(err.Error(), "over memberlist's limit") {
		t.Fatalf("oversized metadata: %v", err)
	}
}

func TestParseKeys(t *testing.T) {
	k16 := base64.StdEncoding.EncodeToString(make([]byte, 16))
	keys, err := ParseKeys("# rotation step 1\n" + NewKey() + "\n\n" + k16 + "\n")
	if err != nil || len(keys) != 2 || len(keys[0]) != 32 || len(keys[1]) != 16 {
		t.Fatalf("ParseKeys = %d keys, %v", len(keys), err)
	}
	for text, want := range map[string]string{
		"":                 "no key",
		"not base64!":      "line 1: not base64",
		"# c\n" + "AAAA\n": "line 2: 3 bytes",
	} {
		if _, err := ParseKeys(text); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseKeys(%q) = %v, want %q", text, err, want)
		}
	}
}
