package routing_test

import (
	"errors"
	"math"
	"math/big"
	"strconv"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cespare/xxhash/v2"
)

func TestShardOf(t *testing.T) {
	mod := routing.ShardRule{Kind: routing.RuleMod}
	ldc := routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{3, 2}}
	tests := []struct {
		name string
		rule routing.ShardRule
		key  string
		n    int
		want int
	}{
		{"mod/example-uid", mod, "2088123456789", 100, 89},
		{"mod/zero-value-rule-is-mod", routing.ShardRule{}, "2088123456789", 100, 89},
		{"mod/zero", mod, "0", 100, 0},
		{"mod/leading-zeros", mod, "000042", 100, 42},
		{"mod/smaller-than-n", mod, "7", 100, 7},
		{"mod/one-shard", mod, "987654321", 1, 0},
		{"mod/max-shards", mod, "65537", routing.MaxShards, 1},
		{"mod/max-uint64", mod, "18446744073709551615", 1000, 615},
		{"mod/beyond-uint64", mod, "18446744073709551616", 1000, 616},
		{"mod/prime-n", mod, "123456789012345678901234567890", 97, 123456789012345678901234567890 % 97},

		{"digits/ldc-example", ldc, "2088123456789", 100, 78},
		{"digits/ldc-short-id-one-digit", ldc, "5", 100, 0},
		{"digits/ldc-short-id-two-digits", ldc, "45", 100, 4},
		{"digits/ldc-exact-length", ldc, "123", 100, 12},
		{"digits/ldc-leading-zeros", ldc, "0000", 100, 0},
		{"digits/last-digit", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{1}}, "2088123456789", 10, 9},
		{"digits/order-is-significance", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{2, 3}}, "2088123456789", 100, 87},
		{"digits/more-values-than-shards", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{3, 2, 1}}, "2088123456789", 100, 789 % 100},
		{"digits/more-values-than-shards-odd-n", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{4, 3, 2, 1}}, "2088123456789", 7, 6789 % 7},
		{"digits/far-position", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{40, 1}}, "9" + strings.Repeat("0", 38) + "5", 100, 95},
		{"digits/far-position-short-id", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{40, 1}}, "5", 100, 5},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.rule.ShardOf(tc.key, tc.n)
			if err != nil {
				t.Fatalf("ShardOf(%q, %d) error: %v", tc.key, tc.n, err)
			}
			if got != tc.want {
				t.Errorf("ShardOf(%q, %d) = %d, want %d", tc.key, tc.n, got, tc.want)
			}
		})
	}
}

// TestShardOfModMatchesBig checks the digit-by-digit remainder against
// math/big for ids of every length up to MaxKeyLen, far beyond 20 digits.
func TestShardOfModMatchesBig(t *testing.T) {
	var ids []string
	for l := 1; l <= routing.MaxKeyLen; l++ {
		var b strings.Builder
		for i := range l {
			// A deterministic spread of digits, different for every length.
			b.WriteByte(byte('0' + (i*7+l*3+i*i)%10))
		}
		ids = append(ids, b.String())
	}
	ids = append(ids, strings.Repeat("9", routing.MaxKeyLen), "1"+strings.Repeat("0", routing.MaxKeyLen-1))
	for _, n := range []int{1, 2, 3, 7, 10, 97, 100, 1000, 4096, 65521, routing.MaxShards} {
		for _, id := range ids {
			got, err := routing.ShardRule{Kind: routing.RuleMod}.ShardOf(id, n)
			if err != nil {
				t.Fatalf("ShardOf(%q, %d): %v", id, n, err)
			}
			v, ok := new(big.Int).SetString(id, 10)
			if !ok {
				t.Fatalf("big: cannot parse %q", id)
			}
			want := new(big.Int).Mod(v, big.NewInt(int64(n))).Int64()
			if int64(got) != want {
				t.Errorf("ShardOf(%q, %d) = %d, want %d (math/big)", id, n, got, want)
			}
		}
	}
}

// TestShardOfDigitsMatchesReading checks the digits rule against reading
// the chosen digits as a number and taking it mod N.
func TestShardOfDigitsMatchesReading(t *testing.T) {
	rules := [][]int{{3, 2}, {1}, {2, 1}, {1, 2}, {5, 3, 1}, {19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1}}
	keys := []string{"0", "7", "12", "2088123456789", "31415926535897932384626433832795028841971", strings.Repeat("86", 30)}
	for _, pos := range rules {
		for _, n := range []int{1, 10, 13, 100, 1000, routing.MaxShards} {
			for _, key := range keys {
				var digits strings.Builder
				for _, p := range pos {
					if p <= len(key) {
						digits.WriteByte(key[len(key)-p])
					} else {
						digits.WriteByte('0')
					}
				}
				v, _ := new(big.Int).SetString(digits.String(), 10)
				want := int(new(big.Int).Mod(v, big.NewInt(int64(n))).Int64())
				got, err := routing.ShardRule{Kind: routing.RuleDigits, Digits: pos}.ShardOf(key, n)
				// Too few digits for n is refused: n must not exceed 10^len(pos).
				tooFew := len(pos) < 5 && n > int(math.Pow10(len(pos)))
				if tooFew != (err != nil) {
					t.Fatalf("digits %v, n %d, key %q: error %v, want an error: %v", pos, n, key, err, tooFew)
				}
				if err != nil {
					continue
				}
				if got != want {
					t.Errorf("digits %v, n %d, key %q: got %d, want %d", pos, n, key, got, want)
				}
			}
		}
	}
}

func TestShardOfHash(t *testing.T) {
	rule := routing.ShardRule{Kind: routing.RuleHash}
	keys := []string{"a", "alice@example.com", "2088123456789", "0", "123e4567-e89b-12d3-a456-426614174000", "ü", strings.Repeat("k", routing.MaxKeyLen)}
	for _, n := range []int{1, 7, 100, routing.MaxShards} {
		for _, key := range keys {
			got, err := rule.ShardOf(key, n)
			if err != nil {
				t.Fatalf("ShardOf(%q, %d): %v", key, n, err)
			}
			if want := int(xxhash.Sum64String(key) % uint64(n)); got != want {
				t.Errorf("ShardOf(%q, %d) = %d, want xxhash64 mod n = %d", key, n, got, want)
			}
			// Stable: the same key always lands on the same shard.
			for range 3 {
				if again, _ := rule.ShardOf(key, n); again != got {
					t.Fatalf("ShardOf(%q, %d) changed from %d to %d", key, n, got, again)
				}
			}
		}
	}
	// Pinned values: a change of hash function or seed would move every
	// user of a hash-ruled topology.
	pinned := map[string]int{"alice@example.com": 70, "bob": 27, "2088123456789": 33}
	if xxhash.Sum64String("") != 0xef46db3751d8e999 {
		t.Fatalf("xxhash64 of the empty string is %#x; the hash function changed", xxhash.Sum64String(""))
	}
	for k, want := range pinned {
		if got, _ := rule.ShardOf(k, 100); got != want {
			t.Errorf("ShardOf(%q, 100) = %d, want %d", k, got, want)
		}
	}
}

// TestShardOfHashSpreads checks that the hash rule uses every shard for a
// modest number of keys: a broken mod or truncated hash would not.
func TestShardOfHashSpreads(t *testing.T) {
	const n = 100
	hit := make([]int, n)
	for i := range 100 * n {
		s, err := routing.ShardRule{Kind: routing.RuleHash}.ShardOf("user-"+strconv.Itoa(i), n)
		if err != nil {
			t.Fatal(err)
		}
		hit[s]++
	}
	for s, c := range hit {
		if c < 50 || c > 150 {
			t.Errorf("shard %d got %d of %d keys, want about 100", s, c, 100*n)
		}
	}
}

func TestShardOfErrors(t *testing.T) {
	mod := routing.ShardRule{Kind: routing.RuleMod}
	ldc := routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{3, 2}}
	hash := routing.ShardRule{Kind: routing.RuleHash}
	long := strings.Repeat("1", routing.MaxKeyLen+1)
	tests := []struct {
		name string
		rule routing.ShardRule
		key  string
		n    int
		want error // a sentinel, or nil for any error
	}{
		{"mod/letters", mod, "abc", 100, routing.ErrNonNumericKey},
		{"mod/trailing-letter", mod, "2088123456789x", 100, routing.ErrNonNumericKey},
		{"mod/sign", mod, "-5", 100, routing.ErrNonNumericKey},
		{"mod/plus", mod, "+5", 100, routing.ErrNonNumericKey},
		{"mod/space", mod, " 5", 100, routing.ErrNonNumericKey},
		{"mod/decimal-point", mod, "5.0", 100, routing.ErrNonNumericKey},
		{"mod/exponent", mod, "1e9", 100, routing.ErrNonNumericKey},
		{"mod/unicode-digit", mod, "٣", 100, routing.ErrNonNumericKey},
		{"mod/empty", mod, "", 100, routing.ErrNoKey},
		{"mod/too-long", mod, long, 100, routing.ErrKeyTooLong},
		{"mod/too-long-non-numeric", mod, long + "x", 100, routing.ErrKeyTooLong},
		{"digits/letters", ldc, "abc", 100, routing.ErrNonNumericKey},
		// The digits the rule does not read must be digits too.
		{"digits/letter-in-unread-position", ldc, "x2088123456789", 100, routing.ErrNonNumericKey},
		{"digits/empty", ldc, "", 100, routing.ErrNoKey},
		{"digits/too-long", ldc, long, 100, routing.ErrKeyTooLong},
		{"hash/empty", hash, "", 100, routing.ErrNoKey},
		{"hash/too-long", hash, long, 100, routing.ErrKeyTooLong},
		{"n/zero", mod, "5", 0, nil},
		{"n/negative", mod, "5", -1, nil},
		{"n/above-max", mod, "5", routing.MaxShards + 1, nil},
		// A rule that Validate refuses is refused here too, never a panic
		// or a silent fallback to another rule.
		{"rule/unknown-kind", routing.ShardRule{Kind: "range"}, "5", 100, nil},
		{"rule/digit-position-zero", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{0}}, "5", 10, nil},
		{"rule/digit-position-negative", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{-3}}, "5", 10, nil},
		{"rule/digits-without-positions", routing.ShardRule{Kind: routing.RuleDigits}, "5", 1, nil},
		{"rule/too-few-digits-for-n", routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{1}}, "5", 100, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.rule.ShardOf(tc.key, tc.n)
			if err == nil {
				t.Fatalf("ShardOf(%q, %d) = %d, want an error", tc.key, tc.n, got)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("ShardOf(%q, %d) error = %v, want %v", tc.key, tc.n, err, tc.want)
			}
		})
	}
}

// The longest key accepted is MaxKeyLen bytes.
func TestShardOfMaxKeyLen(t *testing.T) {
	key := strings.Repeat("9", routing.MaxKeyLen)
	for _, r := range []routing.ShardRule{{Kind: routing.RuleMod}, {Kind: routing.RuleDigits, Digits: []int{3, 2}}, {Kind: routing.RuleHash}} {
		if _, err := r.ShardOf(key, 100); err != nil {
			t.Errorf("%s: a key of MaxKeyLen bytes: %v", r.Kind, err)
		}
	}
}

// ShardMap.ShardOf uses the map's rule and shard count.
func TestShardMapShardOf(t *testing.T) {
	tp := validTopology() // mod 4
	m := mustCompile(t, tp)
	for key, want := range map[string]int{"0": 0, "5": 1, "2088123456789": 1, "1000000000000000000000000000002": 2} {
		if got, err := m.ShardOf(key); err != nil || got != want {
			t.Errorf("ShardOf(%q) = %d, %v; want %d", key, got, err, want)
		}
	}
	if _, err := m.ShardOf("bob"); !errors.Is(err, routing.ErrNonNumericKey) {
		t.Errorf("ShardOf(bob) error = %v, want ErrNonNumericKey", err)
	}

	ex := mustCompile(t, exampleTopology(t))
	if got, err := ex.ShardOf("2088123456789"); err != nil || got != 89 {
		t.Errorf("example: ShardOf(2088123456789) = %d, %v; want 89", got, err)
	}
}

// TestModEveryByte puts every byte value at every position of a 13- and a
// 19-digit id: digits must give the big-integer remainder, anything else
// ErrNonNumericKey (the mod rule reads 8 digits at a time).
func TestModEveryByte(t *testing.T) {
	rule := routing.ShardRule{Kind: routing.RuleMod}
	for _, base := range []string{"2088123456789", "9999999999999999999"} {
		for pos := range len(base) {
			for c := range 256 {
				key := []byte(base)
				key[pos] = byte(c)
				got, err := rule.ShardOf(string(key), 97)
				if c < '0' || c > '9' {
					if !errors.Is(err, routing.ErrNonNumericKey) {
						t.Fatalf("key %q: shard %d, err %v; want ErrNonNumericKey", key, got, err)
					}
					continue
				}
				want := new(big.Int).Mod(mustBig(t, string(key)), big.NewInt(97)).Int64()
				if err != nil || int64(got) != want {
					t.Fatalf("key %q: shard %d, err %v; want %d", key, got, err, want)
				}
			}
		}
	}
}

func mustBig(t *testing.T, s string) *big.Int {
	t.Helper()
	v, ok := new(big.Int).SetString(s, 10)
	if !ok {
		t.Fatalf("not a number: %q", s)
	}
	return v
}
