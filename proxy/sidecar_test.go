package proxy

import (
	"math/big"
	"math/rand/v2"
	"net/http"
	"strconv"
	"testing"
)

// homeOf is where examples/local/topology.yaml puts a uid, computed here
// from the file's ranges, not by routing.
func homeOf(uid string) (unit string, shard int) {
	n, ok := new(big.Int).SetString(uid, 10)
	if !ok {
		panic("not a number: " + uid)
	}
	shard = int(new(big.Int).Mod(n, big.NewInt(100)).Int64())
	switch {
	case shard < 25:
		return "us-east-1", shard
	case shard < 50:
		return "us-east-2", shard
	case shard < 75:
		return "eu-west-1", shard
	}
	return "eu-west-2", shard
}

// Every user id reaches its home unit, from every unit, across regions,
// over QUIC and over the HTTP/2-over-TLS fallback (eu-west-2 here).
func TestEachUserReachesHomeUnit(t *testing.T) {
	m := newMesh(t, meshOpts{h2Units: []string{"eu-west-2"}})
	c := newClient()
	rng := rand.New(rand.NewPCG(1, 2))
	uids := []string{"2088123456789", "0", "99", "100", "18446744073709551617", "7"}
	for range 40 {
		uids = append(uids, strconv.FormatUint(rng.Uint64(), 10))
	}
	for _, from := range m.order {
		for _, uid := range uids {
			want, shard := homeOf(uid)
			resp, body := m.get(c, from, uid, "/v1/accounts")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("uid %s from %s: status %d: %s", uid, from, resp.StatusCode, body)
			}
			e := decodeEcho(t, body)
			if e.Unit != want {
				t.Errorf("uid %s (shard %d) from %s answered by %s, want %s", uid, shard, from, e.Unit, want)
			}
			hdr := func(k string) string {
				if v := e.Headers[http.CanonicalHeaderKey(k)]; len(v) == 1 {
					return v[0]
				}
				return ""
			}
			if got := hdr("x-cellmesh-shard"); got != strconv.Itoa(shard) {
				t.Errorf("uid %s: app saw x-cellmesh-shard %q, want %d", uid, got, shard)
			}
			if got := hdr("x-cellmesh-epoch"); got != "1" {
				t.Errorf("uid %s: app saw x-cellmesh-epoch %q, want 1", uid, got)
			}
			if got := hdr("x-cellmesh-origin-unit"); got != from {
				t.Errorf("uid %s: app saw x-cellmesh-origin-unit %q, want %s", uid, got, from)
			}
			if got := hdr("x-cellmesh-unit"); got != want {
				t.Errorf("uid %s: app saw x-cellmesh-unit %q, want %s", uid, got, want)
			}
			if got := resp.Header.Get("x-cellmesh-unit"); got != want {
				t.Errorf("uid %s: response x-cellmesh-unit %q, want %s", uid, got, want)
			}
		}
	}
}
