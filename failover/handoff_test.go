package failover

import (
	"errors"
	"testing"
)

func TestHandoffChecks(t *testing.T) {
	p := func(c, r uint64) Report {
		return Report{Role: "primary", Epoch: 3, Committed: c, Received: r, Applied: c, Sync: true}
	}
	s := func(r, a uint64, sync bool) Report {
		return Report{Role: "standby", Epoch: 3, Committed: r, Received: r, Applied: a, Sync: sync}
	}
	for _, tc := range []struct {
		name    string
		err     error
		blocked bool
		gap     uint64
	}{
		{"planned: caught up", CheckPlanned(3, p(10, 10), s(10, 10, true)), false, 0},
		{"planned: a write in flight", CheckPlanned(3, p(10, 11), s(11, 11, true)), true, 0},
		{"planned: standby behind", CheckPlanned(3, p(10, 10), s(10, 7, true)), true, 3},
		{"planned: a newer epoch seen", CheckPlanned(2, p(10, 10), s(10, 10, true)), true, 0},
		{"unplanned: in sync", CheckUnplanned(3, s(10, 10, true), nil), false, 0},
		{"unplanned: not in sync", CheckUnplanned(3, s(10, 10, false), nil), true, 0},
		{"unplanned: apply lag", CheckUnplanned(3, s(10, 6, true), nil), true, 4},
		{"unplanned: behind the primary's last report", CheckUnplanned(3, s(10, 10, true), &Report{Committed: 12}), true, 2},
		{"unplanned: the standby of an older epoch", CheckUnplanned(4, s(10, 10, true), nil), true, 0},
		{"unplanned: a shard with no data", CheckUnplanned(3, Report{}, &Report{}), false, 0},
		{"unplanned: no record, the primary unknown", CheckUnplanned(3, Report{}, nil), true, 0},
		{"unplanned: no record, the primary had data", CheckUnplanned(3, Report{}, &Report{Committed: 5}), true, 5},
	} {
		var be *BlockedError
		if got := errors.As(tc.err, &be); got != tc.blocked || (got && be.Gap != tc.gap) {
			t.Errorf("%s: %v, want blocked=%v gap %d", tc.name, tc.err, tc.blocked, tc.gap)
		}
	}
}
