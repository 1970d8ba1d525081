package proxy

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// leaseSkewMargin is taken off every lease: the sidecar counts a lease
// from the moment it received the grant, on its own monotonic clock, and
// the margin covers the grant's time in flight and clock rates.
const leaseSkewMargin = 500 * time.Millisecond

// leaseGrant is the unit's lease as this sidecar received it.
type leaseGrant struct {
	seq      uint64
	ttl      time.Duration // what is left of it at receipt
	full     time.Duration // the TTL the control plane granted
	received time.Time     // with its monotonic reading
}

// LeaseStatus is the unit's lease as /config shows it.
type LeaseStatus struct {
	Seq              uint64  `json:"seq"`
	TTLSeconds       float64 `json:"ttl_seconds"`
	RemainingSeconds float64 `json:"remaining_seconds"`
}

// grantLease records a grant received now. A grant whose seq is not newer
// than the one held (a resend after a reconnect, a late duplicate) is
// ignored: it must not extend the lease. The grant's age at receipt, from
// granted (the leader's wall clock; zero: not said) to now on this
// sidecar's wall clock, is taken off its ttl, so a grant delivered late
// ends when the leader counts it ended. It reports whether the grant was
// taken.
func (s *Sidecar) grantLease(seq uint64, ttl time.Duration, granted time.Time) bool {
	s.leaseMu.Lock()
	defer s.leaseMu.Unlock()
	if cur := s.lease.Load(); cur != nil && seq <= cur.seq {
		return false
	}
	now := time.Now()
	g := &leaseGrant{seq: seq, ttl: ttl, full: ttl, received: now}
	if !granted.IsZero() {
		if age := now.Sub(granted); age > 0 {
			g.ttl = max(0, ttl-age)
		}
	}
	s.lease.Store(g)
	return true
}

// LeaseRemaining is how long the unit's lease lasts from now, as this
// sidecar counts it (its TTL from the grant's receipt, less the grant's
// age at receipt and the skew margin); 0 when none was granted or it
// ended.
func (s *Sidecar) LeaseRemaining() time.Duration {
	g := s.lease.Load()
	if g == nil {
		return 0
	}
	return max(0, g.ttl-leaseSkewMargin-time.Since(g.received))
}

// silenceLimit is how long an xDS stream may stay silent before the
// sidecar gives it up for another replica: half the lease's TTL while the
// unit holds a lease (the leader renews it every quarter TTL, so two
// renewals were missed, and another replica can still renew it in time),
// at least minSilence (the leader looks at leases every 250 ms, then
// commits and pushes: a shorter TTL must not drop healthy streams); 0 (no
// limit) without a lease.
func (s *Sidecar) silenceLimit() time.Duration {
	g := s.lease.Load()
	if g == nil || s.LeaseRemaining() <= 0 {
		return 0
	}
	return max(g.full/2, minSilence)
}

// minSilence is the shortest silence limit (see silenceLimit).
const minSilence = time.Second

func (s *Sidecar) leaseStatus() *LeaseStatus {
	g := s.lease.Load()
	if g == nil {
		return nil
	}
	return &LeaseStatus{Seq: g.seq, TTLSeconds: g.ttl.Seconds(), RemainingSeconds: s.LeaseRemaining().Seconds()}
}

// refuseWithoutLease answers 503 no-lease to a write for one of this
// unit's shards while the unit holds no lease (I3): a unit cut off from
// the control plane stops taking writes before the control plane may
// promote a standby, which it does only after the lease ended on its
// clock. A read goes on, since the data stays readable while no replica
// answers, but its answer is marked x-cellmesh-stale (a standby may own
// the shard by now); a read that asked for x-cellmesh-consistency:
// linearizable is refused as a write is. It applies to a sidecar that
// follows a control plane (xDS); with files there is no lease. It
// reports whether it answered.
func (s *Sidecar) refuseWithoutLease(w http.ResponseWriter, r *http.Request, write bool, shard string) bool {
	if s.xds.Load() == nil || s.LeaseRemaining() > 0 {
		return false
	}
	linearizable := strings.EqualFold(r.Header.Get(hdrConsistency), "linearizable")
	if !write && !linearizable {
		s.m.staleReads.Inc()
		w.Header().Set(hdrStale, "no-lease")
		return false
	}
	what := "writes"
	if !write {
		what = "linearizable reads"
	}
	kind := "read"
	if write {
		kind = "write"
	}
	s.m.noLease.WithLabelValues(kind).Inc()
	w.Header().Set("Retry-After", "1")
	answer(w, http.StatusServiceUnavailable, "no-lease", fmt.Sprintf("unit %s holds no lease from the control plane, so it takes no %s for %s (its shards may be moving to a standby): retry", s.cfg.Identity.Unit, what, shard))
	return true
}
