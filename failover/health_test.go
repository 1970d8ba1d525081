package failover

import (
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 11, 0, 0, 0, 0, time.UTC)

func sidecar(name, region, unit string, st MemberState) Member {
	return Member{Name: name, State: st, Meta: Meta{Role: RoleSidecar, Region: region, Unit: unit, Service: "ledger", Address: "127.0.0.1:1"}}
}

func at(d time.Duration) time.Time { return t0.Add(d) }

func wantUnit(t *testing.T, h *Health, unit string, want UnitState) {
	t.Helper()
	v := h.View()
	if got := v.Unit(unit).State; got != want {
		t.Fatalf("unit %s is %s, want %s (view %+v)", unit, got, want, v.Units)
	}
}

func wantRegion(t *testing.T, h *Health, region string, want UnitState) {
	t.Helper()
	v := h.View()
	if got := v.Region(region).State; got != want {
		t.Fatalf("region %s is %s, want %s (view %+v)", region, got, want, v.Regions)
	}
}

func twoRegions(h *Health, now time.Time) {
	h.SetUnits(now, map[string]string{"us-1": "us", "us-2": "us", "eu-1": "eu"})
}

func TestHealthUnitAndRegionStates(t *testing.T) {
	h := NewHealth(HealthConfig{Grace: time.Second})
	twoRegions(h, t0)
	wantUnit(t, h, "us-1", StateUnknown)
	wantRegion(t, h, "us", StateUnknown)

	h.Observe(at(0), sidecar("a", "us", "us-1", MemberAlive))
	h.Observe(at(0), sidecar("b", "us", "us-1", MemberAlive))
	h.Observe(at(0), sidecar("c", "us", "us-2", MemberAlive))
	h.Observe(at(0), sidecar("d", "eu", "eu-1", MemberAlive))
	wantUnit(t, h, "us-1", StateUp)
	wantRegion(t, h, "us", StateUp)

	h.Observe(at(time.Second), sidecar("a", "us", "us-1", MemberDead))
	wantUnit(t, h, "us-1", StateDegraded)
	wantRegion(t, h, "us", StateDegraded)

	h.Observe(at(10*time.Second), sidecar("b", "us", "us-1", MemberDead))
	wantUnit(t, h, "us-1", StateSuspect) // within the grace
	h.Tick(at(10*time.Second + 999*time.Millisecond))
	wantUnit(t, h, "us-1", StateSuspect)
	h.Tick(at(11 * time.Second))
	wantUnit(t, h, "us-1", StateDown)
	wantRegion(t, h, "us", StateDegraded) // us-2 is up

	h.Observe(at(12*time.Second), sidecar("c", "us", "us-2", MemberLeft))
	h.Tick(at(13 * time.Second))
	wantUnit(t, h, "us-2", StateDown)
	wantRegion(t, h, "us", StateDown)
	wantRegion(t, h, "eu", StateUp)

	// A member that left (a clean restart) counts again at once.
	h.Observe(at(14*time.Second), sidecar("c", "us", "us-2", MemberAlive))
	wantUnit(t, h, "us-2", StateUp)
	wantRegion(t, h, "us", StateDegraded)

	var units, regions int
	for _, e := range h.Events(0) {
		switch e.Kind {
		case "unit":
			units++
		case "region":
			regions++
		}
	}
	if units == 0 || regions == 0 {
		t.Fatalf("events lack unit or region changes: %+v", h.Events(0))
	}
	last := h.Events(0)
	if got := h.Events(last[len(last)-2].Seq); len(got) != 1 || got[0].Seq != last[len(last)-1].Seq {
		t.Fatalf("Events(after) = %+v, want the last one only", got)
	}
}

func TestHealthGraceCancelledByReturn(t *testing.T) {
	h := NewHealth(HealthConfig{Grace: time.Second})
	twoRegions(h, t0)
	h.Observe(at(0), sidecar("a", "us", "us-1", MemberAlive))
	h.Observe(at(time.Second), sidecar("a", "us", "us-1", MemberLeft))
	wantUnit(t, h, "us-1", StateSuspect)
	h.Observe(at(1500*time.Millisecond), sidecar("a", "us", "us-1", MemberAlive))
	h.Tick(at(5 * time.Second))
	wantUnit(t, h, "us-1", StateUp)
	for _, e := range h.Events(0) {
		if e.Kind == "unit" && e.To == string(StateDown) {
			t.Fatalf("unit went down although its member came back within the grace: %+v", e)
		}
	}
}

func TestHealthDampsFlappingMembers(t *testing.T) {
	h := NewHealth(HealthConfig{Grace: time.Second, HoldDown: 2 * time.Second, FlapWindow: time.Minute, MaxHoldDown: 5 * time.Second})
	twoRegions(h, t0)
	now := t0
	step := func(d time.Duration) time.Time { now = now.Add(d); return now }
	h.Observe(now, sidecar("a", "us", "us-1", MemberAlive))
	// Each death holds the member down longer: 2s, 4s, then 5s (the cap).
	for i, hold := range []time.Duration{2 * time.Second, 4 * time.Second, 5 * time.Second} {
		h.Observe(step(time.Second), sidecar("a", "us", "us-1", MemberDead))
		h.Tick(step(2 * time.Second))
		wantUnit(t, h, "us-1", StateDown)
		back := step(time.Second)
		h.Observe(back, sidecar("a", "us", "us-1", MemberAlive))
		v := h.View()
		if got := v.Members[0].HeldUntil; !got.Equal(back.Add(hold)) {
			t.Fatalf("death %d: held until %v, want %v", i+1, got, back.Add(hold))
		}
		h.Tick(back.Add(hold - time.Millisecond))
		wantUnit(t, h, "us-1", StateDown)
		h.Tick(step(hold))
		wantUnit(t, h, "us-1", StateUp)
	}
	// Deaths older than the window no longer count.
	h.Observe(step(2*time.Minute), sidecar("a", "us", "us-1", MemberDead))
	back := step(time.Second)
	h.Observe(back, sidecar("a", "us", "us-1", MemberAlive))
	if v := h.View(); !v.Members[0].HeldUntil.Equal(back.Add(2 * time.Second)) {
		t.Fatalf("after a quiet window: held until %v, want %v", v.Members[0].HeldUntil, back.Add(2*time.Second))
	}
}

func TestHealthForgetsAndDropsUnits(t *testing.T) {
	h := NewHealth(HealthConfig{Forget: time.Minute})
	twoRegions(h, t0)
	h.Observe(at(0), sidecar("a", "us", "us-1", MemberAlive))
	h.Observe(at(time.Second), sidecar("a", "us", "us-1", MemberDead))
	h.Tick(at(30 * time.Second))
	if v := h.View(); len(v.Members) != 1 {
		t.Fatalf("dead member forgotten too early: %+v", v.Members)
	}
	h.Tick(at(2 * time.Minute))
	if v := h.View(); len(v.Members) != 1 {
		t.Fatalf("the last member of a down unit forgotten: %+v", v.Members)
	}
	wantUnit(t, h, "us-1", StateDown) // a lost unit stays down
	// A member of a unit that is not down is forgotten.
	h.Observe(at(3*time.Minute), sidecar("b", "eu", "eu-1", MemberAlive))
	h.Observe(at(3*time.Minute), sidecar("c", "eu", "eu-1", MemberAlive))
	h.Observe(at(3*time.Minute+time.Second), sidecar("c", "eu", "eu-1", MemberLeft))
	h.Tick(at(5 * time.Minute))
	if v := h.View(); len(v.Members) != 2 {
		t.Fatalf("members after forgetting: %+v", v.Members)
	}
	// A unit the topology drops leaves the view.
	h.SetUnits(at(6*time.Minute), map[string]string{"eu-1": "eu"})
	if v := h.View(); len(v.Units) != 1 || len(v.Regions) != 1 {
		t.Fatalf("after the topology change: units %+v regions %+v", v.Units, v.Regions)
	}
}

func TestHealthIgnoresReplicasForUnits(t *testing.T) {
	h := NewHealth(HealthConfig{})
	twoRegions(h, t0)
	h.Observe(at(0), Member{Name: "cp", State: MemberAlive, Meta: Meta{Role: RoleControlPlane, Region: "us"}})
	wantUnit(t, h, "us-1", StateUnknown)
	wantRegion(t, h, "us", StateUnknown)
	if v := h.View(); len(v.Members) != 1 {
		t.Fatalf("members %+v", v.Members)
	}
}
