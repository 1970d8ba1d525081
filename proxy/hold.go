package proxy

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/cellmesh/cellmesh/routing"
)

// Holding requests during a planned handoff: while a shard this unit owns
// is draining, a request for it waits here (it does not reach the app:
// writes, so the standby can catch up; reads, so none reaches the old
// primary once the new one has taken over) until the map moves on, then
// goes where the new map says: to the app if this unit still owns the
// shard, serving; once to the new owner otherwise. Bounded in time
// (holdTimeout) and count (maxHeld); past either the request is answered
// 503 handoff with Retry-After.
const (
	holdTimeout = 3 * time.Second
	maxHeld     = 1000
)

// mapChanged returns a channel closed at the next map change.
func (s *Sidecar) mapChanged() <-chan struct{} {
	return *s.mapCh.Load()
}

// signalMap wakes the holders after a map change.
func (s *Sidecar) signalMap() {
	next := make(chan struct{})
	old := s.mapCh.Swap(&next)
	close(*old)
}

// holdDraining holds a request for shard while it is draining at this
// unit. It returns true when the request may go on (to the app; or
// forwarded when fwd names the new owner); false when it has answered.
func (s *Sidecar) holdDraining(w *statusWriter, r *http.Request, rt *route, shard int) (fwd *routing.Owner, ok bool) {
	self := s.cfg.Identity.Unit
	var start time.Time
	for {
		ch := s.mapChanged()
		m := s.live.Load()
		owner, err := m.Lookup(shard)
		if err != nil {
			return nil, true // the fence answered for the map it had
		}
		switch {
		case owner.Unit != self:
			if !start.IsZero() {
				s.m.holdSeconds.Observe(time.Since(start).Seconds())
			}
			return &owner, true
		case owner.State != routing.StateDraining:
			if !start.IsZero() {
				s.m.holdSeconds.Observe(time.Since(start).Seconds())
			}
			r.Header.Set(hdrEpoch, strconv.FormatUint(owner.Epoch, 10))
			return nil, true
		}
		if start.IsZero() {
			start = time.Now()
			if s.held.Add(1) > maxHeld {
				s.held.Add(-1)
				s.refuseHandoff(w, shard, "more than "+strconv.Itoa(maxHeld)+" writes are held already")
				return nil, false
			}
			defer s.held.Add(-1)
		}
		left := holdTimeout - time.Since(start)
		if left <= 0 {
			s.refuseHandoff(w, shard, "it did not end within "+holdTimeout.String())
			return nil, false
		}
		t := time.NewTimer(left)
		select {
		case <-ch:
			t.Stop()
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return nil, false
		}
	}
}

func (s *Sidecar) refuseHandoff(w *statusWriter, shard int, why string) {
	s.m.holdSeconds.Observe(holdTimeout.Seconds())
	w.Header().Set("Retry-After", "1")
	answer(w, http.StatusServiceUnavailable, "handoff", fmt.Sprintf("%s is being handed off to its standby and holds its requests, but %s: retry", routing.ShardName(shard), why))
}
