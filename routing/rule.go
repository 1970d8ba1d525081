package routing

import (
	"errors"
	"fmt"

	"github.com/cespare/xxhash/v2"
)

// RuleKind names how a user key becomes a shard.
type RuleKind string

// Shard rules.
const (
	// RuleMod: the numeric user id mod N. Ids of any length up to MaxKeyLen
	// are accepted; longer ones are reduced 14 digits at a time.
	RuleMod RuleKind = "mod"
	// RuleDigits: chosen decimal digits of the numeric user id, counted from
	// the end (1 is the last digit), read as a number, mod N. Ant's LDC takes
	// the 3rd- and 2nd-to-last digits: Digits = [3, 2].
	RuleDigits RuleKind = "digits"
	// RuleHash: xxhash64 of the key bytes, mod N. Any key.
	RuleHash RuleKind = "hash"
)

// MaxKeyLen is the longest user key accepted, in bytes.
const MaxKeyLen = 256

// ShardRule is the rule that maps a user key to a shard. The zero value is
// RuleMod.
type ShardRule struct {
	Kind RuleKind
	// Digits are the positions, counted from the end starting at 1, that
	// RuleDigits reads, most significant first. Only for RuleDigits.
	Digits []int
}

// Errors of key-to-shard mapping; the decision wraps them in *KeyError.
var (
	// ErrNoKey: the request carries no user key where the route needs one.
	ErrNoKey = errors.New("no user key")
	// ErrNonNumericKey: the rule needs a decimal user id and the key is not.
	ErrNonNumericKey = errors.New("user key is not a decimal number")
	// ErrKeyTooLong: the key is longer than MaxKeyLen.
	ErrKeyTooLong = errors.New("user key too long")
	// ErrAmbiguousKey: the key source appears more than once with different values.
	ErrAmbiguousKey = errors.New("user key given more than once with different values")
	// ErrBadKeyEncoding: a query key has a malformed percent-escape.
	ErrBadKeyEncoding = errors.New("bad percent-encoding")
)

func (r ShardRule) kind() RuleKind {
	if r.Kind == "" {
		return RuleMod
	}
	return r.Kind
}

func (r ShardRule) validate(n int, ps *problems) {
	switch r.kind() {
	case RuleMod, RuleHash:
		if len(r.Digits) > 0 {
			ps.add("shard_rule", "digits are only for the digits rule, not %q", r.kind())
		}
	case RuleDigits:
		if len(r.Digits) == 0 {
			ps.add("shard_rule", "the digits rule needs at least one digit position")
			return
		}
		if len(r.Digits) > 19 {
			ps.add("shard_rule", "the digits rule takes at most 19 digit positions, got %d", len(r.Digits))
			return
		}
		seen := map[int]bool{}
		for _, d := range r.Digits {
			if d < 1 || d > 40 {
				ps.add("shard_rule", "digit position %d is out of range 1..40 (1 is the last digit)", d)
			}
			if seen[d] {
				ps.add("shard_rule", "digit position %d is listed twice", d)
			}
			seen[d] = true
		}
		values := 1
		for range r.Digits {
			values *= 10
			if values >= n {
				break
			}
		}
		if n > 0 && values < n {
			ps.add("shard_rule", "%d digit(s) give only %d values: shards %d..%d would never get a user; use more digits or fewer shards", len(r.Digits), values, values, n-1)
		}
	default:
		ps.add("shard_rule", "rule %q is unknown (want mod, digits or hash)", r.Kind)
	}
}

// shardOf maps a key to a shard in 0..n-1. It does not allocate.
func (r *ShardRule) shardOf(key string, n int) (int, error) {
	if key == "" {
		return 0, ErrNoKey
	}
	if len(key) > MaxKeyLen {
		return 0, ErrKeyTooLong
	}
	switch r.kind() {
	case RuleHash:
		return int(xxhash.Sum64String(key) % uint64(n)), nil
	case RuleDigits:
		if !numeric(key) {
			return 0, ErrNonNumericKey
		}
		v := 0
		for _, pos := range r.Digits {
			d := 0
			if pos <= len(key) {
				d = int(key[len(key)-pos] - '0')
			}
			v = (v*10 + d) % n
		}
		return v, nil
	default:
		// Read 14 digits at a time and reduce once per chunk: v < n <= 2^16
		// and 10^14 < 2^47, so v*10^14 + chunk stays below 2^64.
		m := uint64(n)
		var v uint64
		if len(key) <= 19 { // fits in a uint64: one division
			i := 0
			for ; len(key)-i >= 8; i += 8 {
				chunk, ok := eightDigits(key[i : i+8])
				if !ok {
					return 0, ErrNonNumericKey
				}
				v = v*1e8 + chunk
			}
			for ; i < len(key); i++ {
				c := key[i] - '0'
				if c > 9 {
					return 0, ErrNonNumericKey
				}
				v = v*10 + uint64(c)
			}
			return int(v % m), nil
		}
		for i := 0; i < len(key); {
			end := min(i+14, len(key))
			var chunk, scale uint64 = 0, 1
			for ; i < end; i++ {
				c := key[i]
				if c < '0' || c > '9' {
					return 0, ErrNonNumericKey
				}
				chunk = chunk*10 + uint64(c-'0')
				scale *= 10
			}
			v = (v*scale + chunk) % m
		}
		return int(v), nil
	}
}

// eightDigits parses 8 decimal digits at once (SWAR, after Lemire's
// parse_eight_digits_unrolled); ok is false when any byte is not a digit.
func eightDigits(s string) (v uint64, ok bool) {
	x := uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
	if (x&0xF0F0F0F0F0F0F0F0)|((x+0x0606060606060606)&0xF0F0F0F0F0F0F0F0)>>4 != 0x3333333333333333 {
		return 0, false
	}
	x -= 0x3030303030303030
	x = x*10 + x>>8
	x = ((x&0x000000FF000000FF)*(100+1000000<<32) + (x>>16&0x000000FF000000FF)*(1+10000<<32)) >> 32
	return x, true
}

func numeric(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// ShardOf maps a user key to its shard under rule r with n shards. A rule
// that Validate would refuse is an error.
func (r ShardRule) ShardOf(key string, n int) (int, error) {
	if n < 1 || n > MaxShards {
		return 0, fmt.Errorf("shard count %d is out of range 1..%d", n, MaxShards)
	}
	var ps problems
	r.validate(n, &ps)
	if len(ps) > 0 {
		return 0, fmt.Errorf("invalid shard rule: %s", ps[0].Message)
	}
	return r.shardOf(key, n)
}
