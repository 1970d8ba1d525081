package routing_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/google/go-cmp/cmp"
)

var (
	srcHeader = routing.KeySource{Kind: routing.KeyHeader, Name: "x-cellmesh-uid"}
	srcCookie = routing.KeySource{Kind: routing.KeyCookie, Name: "uid"}
	srcQuery  = routing.KeySource{Kind: routing.KeyQuery, Name: "uid"}
	srcPath   = routing.KeySource{Kind: routing.KeyPath, Name: "/v1/users/{key}"}
)

// keyMap compiles validTopology with the given key sources.
func keyMap(tb testing.TB, keys ...routing.KeySource) *routing.ShardMap {
	tb.Helper()
	tp := validTopology()
	tp.Keys = keys
	return mustCompile(tb, tp)
}

type keyCase struct {
	name    string
	req     routing.Request
	want    string
	wantSrc routing.KeySource
	wantErr error // a sentinel; errAny for an error without one
}

var errAny = errors.New("any error")

func runKeyCases(t *testing.T, m *routing.ShardMap, tests []keyCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, src, err := m.Key(&tc.req)
			switch {
			case tc.wantErr == errAny:
				if err == nil {
					t.Fatalf("Key() = %q, %v, nil; want an error", got, src)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Key() = %q, %v, %v; want error %v", got, src, err, tc.wantErr)
				}
			case err != nil:
				t.Fatalf("Key() error: %v", err)
			case got != tc.want:
				t.Errorf("Key() = %q, want %q", got, tc.want)
			}
			if diff := cmp.Diff(tc.wantSrc, src); diff != "" {
				t.Errorf("Key() source (-want +got):\n%s", diff)
			}
		})
	}
}

func TestKeyPrecedence(t *testing.T) {
	all := routing.Request{
		Path:     "/v1/users/4",
		RawQuery: "uid=3",
		Header:   header("X-Cellmesh-Uid", "1", "Cookie", "uid=2"),
	}
	noHeader := all
	noHeader.Header = header("Cookie", "uid=2")
	noCookie := all
	noCookie.Header = http.Header{}
	onlyPath := routing.Request{Path: "/v1/users/4"}

	t.Run("configured-order", func(t *testing.T) {
		m := keyMap(t, srcHeader, srcCookie, srcQuery, srcPath)
		runKeyCases(t, m, []keyCase{
			{name: "header-first", req: all, want: "1", wantSrc: srcHeader},
			{name: "then-cookie", req: noHeader, want: "2", wantSrc: srcCookie},
			{name: "then-query", req: noCookie, want: "3", wantSrc: srcQuery},
			{name: "then-path", req: onlyPath, want: "4", wantSrc: srcPath},
			{name: "none", req: routing.Request{Path: "/v1/orders", RawQuery: "id=5", Header: header("X-Other", "6")}},
			{name: "nil-header", req: routing.Request{Path: "/v1/users/4"}, want: "4", wantSrc: srcPath},
		})
	})
	t.Run("reversed-order", func(t *testing.T) {
		m := keyMap(t, srcPath, srcQuery, srcCookie, srcHeader)
		runKeyCases(t, m, []keyCase{
			{name: "path-first", req: all, want: "4", wantSrc: srcPath},
			{name: "query-before-cookie", req: routing.Request{RawQuery: "uid=3", Header: all.Header}, want: "3", wantSrc: srcQuery},
			{name: "cookie-before-header", req: routing.Request{Header: all.Header}, want: "2", wantSrc: srcCookie},
		})
	})
	t.Run("default-header", func(t *testing.T) {
		m := keyMap(t)
		runKeyCases(t, m, []keyCase{
			{name: "header", req: all, want: "1", wantSrc: srcHeader},
			{name: "cookie-ignored", req: noHeader},
		})
	})
	t.Run("error-stops-the-search", func(t *testing.T) {
		// A source that is present but broken is an error, even when a
		// later source would give a key.
		m := keyMap(t, srcHeader, srcQuery, srcPath)
		runKeyCases(t, m, []keyCase{
			{name: "ambiguous-header", req: routing.Request{Path: "/v1/users/4", Header: header("X-Cellmesh-Uid", "1", "X-Cellmesh-Uid", "2")},
				wantSrc: srcHeader, wantErr: routing.ErrAmbiguousKey},
			{name: "bad-query", req: routing.Request{Path: "/v1/users/4", RawQuery: "uid=%zz"}, wantSrc: srcQuery, wantErr: errAny},
		})
	})
}

func TestKeyHeader(t *testing.T) {
	m := keyMap(t, routing.KeySource{Kind: routing.KeyHeader, Name: "X-USER-id"})
	src := routing.KeySource{Kind: routing.KeyHeader, Name: "X-USER-id"}
	runKeyCases(t, m, []keyCase{
		{name: "canonical", req: routing.Request{Header: header("X-User-Id", "42")}, want: "42", wantSrc: src},
		{name: "lowercase-set", req: routing.Request{Header: header("x-user-id", "42")}, want: "42", wantSrc: src},
		{name: "plain-map-headers", req: routing.Request{Header: map[string][]string{"X-User-Id": {"42"}}}, want: "42", wantSrc: src},
		{name: "spaces-trimmed", req: routing.Request{Header: header("X-User-Id", "  42\t")}, want: "42", wantSrc: src},
		{name: "twice-same-value", req: routing.Request{Header: header("X-User-Id", "42", "X-User-Id", " 42")}, want: "42", wantSrc: src},
		{name: "twice-different-values", req: routing.Request{Header: header("X-User-Id", "42", "X-User-Id", "43")}, wantSrc: src, wantErr: routing.ErrAmbiguousKey},
		{name: "twice-one-empty", req: routing.Request{Header: header("X-User-Id", "", "X-User-Id", "43")}, want: "43", wantSrc: src},
		{name: "empty-is-absent", req: routing.Request{Header: header("X-User-Id", " ")}},
		{name: "other-header", req: routing.Request{Header: header("X-User", "42")}},
		// A comma-joined value is one value, not a list: it is the key as given.
		{name: "comma-list-is-one-value", req: routing.Request{Header: header("X-User-Id", "42, 43")}, want: "42, 43", wantSrc: src},
	})
}

func TestKeyCookie(t *testing.T) {
	m := keyMap(t, srcCookie)
	c := func(lines ...string) routing.Request {
		h := http.Header{}
		for _, l := range lines {
			h.Add("Cookie", l)
		}
		return routing.Request{Header: h}
	}
	runKeyCases(t, m, []keyCase{
		{name: "only", req: c("uid=42"), want: "42", wantSrc: srcCookie},
		{name: "among-others", req: c("a=1; uid=42; b=2"), want: "42", wantSrc: srcCookie},
		{name: "no-spaces", req: c("a=1;uid=42;b=2"), want: "42", wantSrc: srcCookie},
		{name: "quoted", req: c(`uid="42"`), want: "42", wantSrc: srcCookie},
		{name: "quoted-among-others", req: c(`a=1; uid="42"`), want: "42", wantSrc: srcCookie},
		{name: "lone-quote-kept", req: c(`uid="`), want: `"`, wantSrc: srcCookie},
		{name: "value-with-equals", req: c("uid=a=b"), want: "a=b", wantSrc: srcCookie},
		{name: "second-line", req: c("a=1", "uid=42"), want: "42", wantSrc: srcCookie},
		{name: "two-lines-same-value", req: c("uid=42", `uid="42"`), want: "42", wantSrc: srcCookie},
		{name: "two-lines-different-values", req: c("uid=42", "uid=43"), wantSrc: srcCookie, wantErr: routing.ErrAmbiguousKey},
		{name: "one-line-different-values", req: c("uid=42; uid=43"), wantSrc: srcCookie, wantErr: routing.ErrAmbiguousKey},
		{name: "one-line-same-value", req: c("uid=42; a=1; uid=42"), want: "42", wantSrc: srcCookie},
		{name: "missing", req: c("a=1; b=2")},
		{name: "no-cookie-header", req: routing.Request{Header: http.Header{}}},
		{name: "nil-headers", req: routing.Request{}},
		{name: "prefix-name-does-not-match", req: c("xuid=42; uidx=43")},
		{name: "name-is-case-sensitive", req: c("UID=42")},
		{name: "empty-value-is-absent", req: c("uid=")},
		{name: "empty-then-set", req: c("uid=", "uid=42"), want: "42", wantSrc: srcCookie},
		{name: "name-without-value", req: c("uid")},
	})
}

func TestKeyQuery(t *testing.T) {
	m := keyMap(t, srcQuery)
	q := func(raw string) routing.Request { return routing.Request{RawQuery: raw} }
	runKeyCases(t, m, []keyCase{
		{name: "only", req: q("uid=42"), want: "42", wantSrc: srcQuery},
		{name: "among-others", req: q("a=1&uid=42&b=2"), want: "42", wantSrc: srcQuery},
		{name: "percent-encoded-value", req: q("uid=%34%32"), want: "42", wantSrc: srcQuery},
		{name: "lowercase-hex", req: q("uid=a%2fb"), want: "a/b", wantSrc: srcQuery},
		{name: "plus-is-space", req: q("uid=a+b"), want: "a b", wantSrc: srcQuery},
		{name: "encoded-plus", req: q("uid=a%2Bb"), want: "a+b", wantSrc: srcQuery},
		{name: "encoded-name", req: q("u%69d=42"), want: "42", wantSrc: srcQuery},
		{name: "encoded-name-bad-escape-skipped", req: q("u%zzd=7&uid=42"), want: "42", wantSrc: srcQuery},
		{name: "bad-escape-in-other-parameter-ignored", req: q("a=%zz&uid=42"), want: "42", wantSrc: srcQuery},
		{name: "bad-escape", req: q("uid=%zz"), wantSrc: srcQuery, wantErr: errAny},
		{name: "truncated-escape", req: q("uid=4%2"), wantSrc: srcQuery, wantErr: errAny},
		{name: "escape-at-end", req: q("uid=42%"), wantSrc: srcQuery, wantErr: errAny},
		{name: "twice-same-value", req: q("uid=42&uid=%342"), want: "42", wantSrc: srcQuery},
		{name: "twice-different-values", req: q("uid=42&uid=43"), wantSrc: srcQuery, wantErr: routing.ErrAmbiguousKey},
		{name: "empty-then-set", req: q("uid=&uid=43"), want: "43", wantSrc: srcQuery},
		{name: "plain-and-encoded-name-differ", req: q("uid=42&u%69d=43"), wantSrc: srcQuery, wantErr: routing.ErrAmbiguousKey},
		{name: "missing", req: q("a=1&b=2")},
		{name: "empty-query", req: q("")},
		{name: "prefix-name-does-not-match", req: q("uidx=42&xuid=43")},
		{name: "empty-value-is-absent", req: q("uid=")},
		{name: "no-equals-is-absent", req: q("uid")},
		{name: "semicolon-is-not-a-separator", req: q("a=1;uid=42")},
		{name: "empty-parts", req: q("&&uid=42&"), want: "42", wantSrc: srcQuery},
		{name: "fragment-like-text-is-data", req: q("uid=42%23x"), want: "42#x", wantSrc: srcQuery},
	})

	// The error for a bad escape names the parameter.
	_, _, err := m.Key(&routing.Request{RawQuery: "uid=%zz"})
	if err == nil || !strings.Contains(err.Error(), `query parameter "uid"`) {
		t.Errorf("bad escape error = %v, want it to name the parameter", err)
	}
}

func TestKeyPath(t *testing.T) {
	p := func(path string) routing.Request { return routing.Request{Path: path} }
	t.Run("users", func(t *testing.T) {
		m := keyMap(t, srcPath)
		runKeyCases(t, m, []keyCase{
			{name: "exact", req: p("/v1/users/42"), want: "42", wantSrc: srcPath},
			{name: "trailing-slash", req: p("/v1/users/42/"), want: "42", wantSrc: srcPath},
			{name: "prefix-match", req: p("/v1/users/42/orders/7"), want: "42", wantSrc: srcPath},
			{name: "no-key-segment", req: p("/v1/users")},
			{name: "empty-key-segment", req: p("/v1/users/")},
			{name: "empty-key-segment-before-more", req: p("/v1/users//orders")},
			{name: "other-prefix", req: p("/v2/users/42")},
			{name: "literal-is-whole-segment", req: p("/v1/usersx/42")},
			{name: "case-sensitive", req: p("/V1/users/42")},
			{name: "double-slash", req: p("//v1/users/42")},
			{name: "relative", req: p("v1/users/42")},
			{name: "empty", req: p("")},
			{name: "root", req: p("/")},
			// Path segments are not unescaped: the key is the raw segment.
			{name: "escaped-segment-is-raw", req: p("/v1/users/4%32"), want: "4%32", wantSrc: srcPath},
		})
	})
	t.Run("wildcards", func(t *testing.T) {
		src := routing.KeySource{Kind: routing.KeyPath, Name: "/v1/*/users/{key}/*"}
		m := keyMap(t, src)
		runKeyCases(t, m, []keyCase{
			{name: "match", req: p("/v1/acme/users/42/orders"), want: "42", wantSrc: src},
			{name: "match-and-more", req: p("/v1/acme/users/42/orders/9"), want: "42", wantSrc: src},
			{name: "star-needs-a-segment", req: p("/v1/acme/users/42")},
			{name: "star-needs-a-non-empty-segment", req: p("/v1//users/42/orders")},
			{name: "literal-mismatch", req: p("/v1/acme/people/42/orders")},
		})
	})
	t.Run("first-segment", func(t *testing.T) {
		src := routing.KeySource{Kind: routing.KeyPath, Name: "/{key}"}
		m := keyMap(t, src)
		runKeyCases(t, m, []keyCase{
			{name: "match", req: p("/42"), want: "42", wantSrc: src},
			{name: "match-and-more", req: p("/42/x"), want: "42", wantSrc: src},
			{name: "root", req: p("/")},
		})
	})
}

func TestZoneRules(t *testing.T) {
	yes, no := true, false
	tp := validTopology()
	tp.Zones = routing.ZoneRules{Rules: []routing.ZoneRule{
		{Methods: []string{"GET", "head"}, PathPrefix: "/v1/config/", Zone: routing.KindCZone},
		{PathPrefix: "/v1/config/", Zone: routing.KindGZone},
		{Path: "/v1/fx/*/quote", Methods: []string{"POST"}, Zone: routing.KindCZone, Write: &no},
		{Path: "/v1/audit", Zone: routing.KindRZone, Write: &yes},
		{Methods: []string{"PURGE"}, Zone: routing.KindGZone},
	}}
	m := mustCompile(t, tp)
	tests := []struct {
		name   string
		method string
		path   string
		zone   routing.Zone
		write  bool
	}{
		{"method-list/get", "GET", "/v1/config/fx", routing.KindCZone, false},
		{"method-list/head-lowercase-in-rule", "HEAD", "/v1/config/fx", routing.KindCZone, false},
		{"method-list/lowercase-request", "get", "/v1/config/fx", routing.KindCZone, false},
		{"method-list/miss-falls-through", "PUT", "/v1/config/fx", routing.KindGZone, true},
		{"path-prefix/is-a-string-prefix", "POST", "/v1/config/", routing.KindGZone, true},
		{"path-prefix/miss", "POST", "/v1/configs", routing.KindRZone, true},
		{"path-prefix/first-match-wins", "DELETE", "/v1/config/fx", routing.KindGZone, true},
		{"path-pattern/star", "POST", "/v1/fx/usd/quote", routing.KindCZone, false},
		{"path-pattern/matches-beginning", "POST", "/v1/fx/usd/quote/eur", routing.KindCZone, false},
		{"path-pattern/segment-mismatch", "POST", "/v1/fx/usd/quotes", routing.KindRZone, true},
		{"path-pattern/star-needs-segment", "POST", "/v1/fx/quote", routing.KindRZone, true},
		{"path-pattern/method-mismatch", "GET", "/v1/fx/usd/quote", routing.KindRZone, false},
		{"write-override/read-method-writes", "GET", "/v1/audit", routing.KindRZone, true},
		{"write-override/false", "POST", "/v1/fx/eur/quote", routing.KindCZone, false},
		{"methods-only", "PURGE", "/anything", routing.KindGZone, true},
		{"default/get-reads", "GET", "/v1/orders", routing.KindRZone, false},
		{"default/head-reads", "HEAD", "/v1/orders", routing.KindRZone, false},
		{"default/options-reads", "OPTIONS", "/v1/orders", routing.KindRZone, false},
		{"default/trace-reads", "TRACE", "/v1/orders", routing.KindRZone, false},
		{"default/post-writes", "POST", "/v1/orders", routing.KindRZone, true},
		{"default/put-writes", "PUT", "/v1/orders", routing.KindRZone, true},
		{"default/patch-writes", "PATCH", "/v1/orders", routing.KindRZone, true},
		{"default/delete-writes", "DELETE", "/v1/orders", routing.KindRZone, true},
		{"default/empty-method-reads", "", "/v1/orders", routing.KindRZone, false},
		{"default/empty-path", "POST", "", routing.KindRZone, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			zone, write := m.Zone(&routing.Request{Method: tc.method, Path: tc.path})
			if zone != tc.zone || write != tc.write {
				t.Errorf("Zone(%s %s) = %s, write %v; want %s, write %v", tc.method, tc.path, zone, write, tc.zone, tc.write)
			}
		})
	}
}

func TestZoneRulesFirstMatchWins(t *testing.T) {
	tp := validTopology()
	tp.Zones = routing.ZoneRules{Rules: []routing.ZoneRule{
		{PathPrefix: "/v1/", Zone: routing.KindGZone},
		{PathPrefix: "/v1/config/", Zone: routing.KindCZone},
	}}
	m := mustCompile(t, tp)
	if zone, _ := m.Zone(&routing.Request{Method: "GET", Path: "/v1/config/x"}); zone != routing.KindGZone {
		t.Errorf("zone = %s, want the first matching rule's gzone", zone)
	}
	tp.Zones.Rules[0], tp.Zones.Rules[1] = tp.Zones.Rules[1], tp.Zones.Rules[0]
	m = mustCompile(t, tp)
	if zone, _ := m.Zone(&routing.Request{Method: "GET", Path: "/v1/config/x"}); zone != routing.KindCZone {
		t.Errorf("swapped: zone = %s, want czone", zone)
	}
}

func TestZoneDefault(t *testing.T) {
	for _, def := range []routing.Zone{"", routing.KindRZone, routing.KindGZone, routing.KindCZone} {
		tp := validTopology()
		tp.Zones = routing.ZoneRules{Default: def}
		m := mustCompile(t, tp)
		want := def
		if want == "" {
			want = routing.KindRZone
		}
		if zone, write := m.Zone(&routing.Request{Method: "POST", Path: "/x"}); zone != want || !write {
			t.Errorf("default %q: Zone = %s, %v; want %s, true", def, zone, write, want)
		}
	}
}

func TestIsWriteMethod(t *testing.T) {
	for m, want := range map[string]bool{
		"GET": false, "HEAD": false, "OPTIONS": false, "TRACE": false,
		"get": false, "Head": false, "options": false, "trace": false, "": false,
		"POST": true, "PUT": true, "PATCH": true, "DELETE": true, "CONNECT": true, "PURGE": true, "post": true, "GETX": true,
	} {
		if got := routing.IsWriteMethod(m); got != want {
			t.Errorf("IsWriteMethod(%q) = %v, want %v", m, got, want)
		}
	}
}

func TestKeySourceString(t *testing.T) {
	for src, want := range map[routing.KeySource]string{
		srcHeader: "header x-cellmesh-uid",
		srcCookie: "cookie uid",
		srcQuery:  "query uid",
		srcPath:   "path /v1/users/{key}",
	} {
		if got := src.String(); got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
	}
}
