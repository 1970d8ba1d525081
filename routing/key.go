package routing

import (
	"fmt"
	"strings"
)

// DefaultKeyHeader is the header the user key comes from when no key source
// is configured.
const DefaultKeyHeader = "x-cellmesh-uid"

// KeySourceKind names where a user key is read from.
type KeySourceKind string

// Key sources.
const (
	KeyHeader KeySourceKind = "header"
	KeyCookie KeySourceKind = "cookie"
	KeyQuery  KeySourceKind = "query"
	KeyPath   KeySourceKind = "path"
)

// KeySource is one place a user key is read from. Sources are tried in order;
// the first that is present gives the key.
type KeySource struct {
	Kind KeySourceKind
	// Name is the header, cookie or query parameter name. For KeyPath it is
	// the pattern: segments separated by '/', where '*' matches any one
	// segment and '{key}' marks the segment that holds the key, as in
	// "/v1/users/{key}". The pattern matches the beginning of the path.
	Name string
}

func (k KeySource) String() string { return string(k.Kind) + " " + k.Name }

// Request holds the facts about a request that routing decides on.
type Request struct {
	Method string
	// Path is the URL path, without the query.
	Path string
	// RawQuery is the URL query without '?', still encoded.
	RawQuery string
	// Header maps canonical MIME header names to values, as http.Header
	// does (an http.Header is assignable to it as it is).
	Header map[string][]string
	// LocalUnit is the unit of the sidecar deciding; czone routes go to a
	// czone unit of its region, or to it.
	LocalUnit string
}

// keySource is a compiled KeySource.
type keySource struct {
	kind    KeySourceKind
	name    string   // canonical header name, cookie or query name
	pattern []string // path segments
	keyAt   int      // index of {key} in pattern
}

func compileKeySource(k KeySource) (keySource, error) {
	ks := keySource{kind: k.Kind, name: k.Name}
	switch k.Kind {
	case KeyHeader:
		if !validToken(k.Name) {
			return ks, fmt.Errorf("header name %q is not a valid HTTP header name", k.Name)
		}
		ks.name = canonicalHeader(k.Name)
	case KeyCookie, KeyQuery:
		if k.Name == "" || strings.ContainsAny(k.Name, "=;&# \t\r\n") {
			return ks, fmt.Errorf("%s name %q must be non-empty and contain none of = ; & # or spaces", k.Kind, k.Name)
		}
	case KeyPath:
		segs, err := parsePattern(k.Name, true)
		if err != nil {
			return ks, err
		}
		ks.pattern = segs
		ks.keyAt = -1
		for i, s := range segs {
			if s == "{key}" {
				if ks.keyAt >= 0 {
					return ks, fmt.Errorf("path pattern %q has {key} more than once", k.Name)
				}
				ks.keyAt = i
			}
		}
		if ks.keyAt < 0 {
			return ks, fmt.Errorf("path pattern %q has no {key} segment", k.Name)
		}
	default:
		return ks, fmt.Errorf("key source %q is unknown (want header, cookie, query or path)", k.Kind)
	}
	return ks, nil
}

func validateKeys(keys []KeySource, ps *problems) {
	for i, k := range keys {
		if _, err := compileKeySource(k); err != nil {
			ps.add(fmt.Sprintf("key[%d]", i), "%v", err)
		}
	}
}

// parsePattern splits a path pattern into segments. Segments are literals,
// "*" or (when withKey) "{key}".
func parsePattern(p string, withKey bool) ([]string, error) {
	if !strings.HasPrefix(p, "/") {
		return nil, fmt.Errorf("path pattern %q must start with '/'", p)
	}
	if len(p) > 1024 {
		return nil, fmt.Errorf("path pattern is longer than 1024 bytes")
	}
	segs := strings.Split(strings.TrimSuffix(p[1:], "/"), "/")
	for _, s := range segs {
		switch {
		case s == "":
			return nil, fmt.Errorf("path pattern %q has an empty segment", p)
		case s == "{key}" && withKey, s == "*":
		case strings.ContainsAny(s, "{}*?#"):
			return nil, fmt.Errorf("path pattern %q: segment %q must be a literal, '*'%s", p, s, map[bool]string{true: " or '{key}'", false: ""}[withKey])
		}
	}
	return segs, nil
}

// matchPattern reports whether path begins with the pattern's segments and
// returns the segment at index at (or "" when at < 0). It does not allocate.
func matchPattern(pattern []string, path string, at int) (string, bool) {
	if len(path) == 0 || path[0] != '/' {
		return "", false
	}
	rest := path[1:]
	var got string
	for i, want := range pattern {
		if rest == "" && i < len(pattern) {
			return "", false
		}
		seg := rest
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			seg, rest = rest[:j], rest[j+1:]
		} else {
			rest = ""
		}
		if seg == "" {
			return "", false
		}
		if i == at {
			got = seg
		} else if want != "*" && want != seg {
			return "", false
		}
	}
	return got, true
}

// extract returns the key from r under this source, "" when absent.
func (k *keySource) extract(r *Request) (string, error) {
	switch k.kind {
	case KeyHeader:
		if r.Header == nil {
			return "", nil
		}
		return single(r.Header[k.name])
	case KeyCookie:
		if r.Header == nil {
			return "", nil
		}
		var v string
		for _, line := range r.Header["Cookie"] {
			c, err := cookieValue(line, k.name)
			if err != nil {
				return "", err
			}
			if v, err = merge(v, c); err != nil {
				return "", err
			}
		}
		return v, nil
	case KeyQuery:
		return queryValue(r.RawQuery, k.name)
	case KeyPath:
		v, _ := matchPattern(k.pattern, r.Path, k.keyAt)
		return v, nil
	}
	return "", nil
}

// single returns the one value of a header given on several lines; empty
// values count as absent, as for cookies and query parameters.
func single(vs []string) (string, error) {
	if len(vs) == 1 {
		return trim(vs[0]), nil
	}
	var v string
	var err error
	for _, o := range vs {
		if v, err = merge(v, trim(o)); err != nil {
			return "", err
		}
	}
	return v, nil
}

// merge adds one more value of a key source to the value found so far:
// empty values count as absent, and two different ones are ambiguous.
func merge(have, next string) (string, error) {
	switch {
	case next == "" || next == have:
		return have, nil
	case have == "":
		return next, nil
	}
	return "", ErrAmbiguousKey
}

// trim removes surrounding white space; header values usually have none.
func trim(s string) string {
	if s == "" || s[0] > ' ' && s[len(s)-1] > ' ' {
		return s
	}
	return strings.TrimSpace(s)
}

// cookieValue finds name in one Cookie header line ("a=1; b=2"). The same
// name twice with different values is ambiguous, as across lines.
func cookieValue(line, name string) (found string, err error) {
	for line != "" {
		var part string
		part, line, _ = strings.Cut(line, ";")
		part = strings.TrimSpace(part)
		k, v, ok := strings.Cut(part, "=")
		if !ok || k != name {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		if found, err = merge(found, v); err != nil {
			return "", err
		}
	}
	return found, nil
}

// queryValue finds name in a raw query and unescapes its value. Two different
// values for the name are ambiguous.
func queryValue(q, name string) (v string, err error) {
	for q != "" {
		var part string
		part, q, _ = strings.Cut(q, "&")
		k, raw, _ := strings.Cut(part, "=")
		if k != name {
			if strings.IndexByte(k, '%') < 0 && strings.IndexByte(k, '+') < 0 {
				continue
			}
			uk, err := unescape(k)
			if err != nil || uk != name {
				continue
			}
		}
		val, err := unescape(raw)
		if err != nil {
			return "", fmt.Errorf("query parameter %q: %w", name, err)
		}
		if v, err = merge(v, val); err != nil {
			return "", err
		}
	}
	return v, nil
}

// unescape decodes %XX and '+' in a query value. It allocates only when s
// holds an escape.
func unescape(s string) (string, error) {
	if strings.IndexByte(s, '%') < 0 && strings.IndexByte(s, '+') < 0 {
		return s, nil
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '+':
			b = append(b, ' ')
		case '%':
			if i+2 >= len(s) || unhex(s[i+1]) < 0 || unhex(s[i+2]) < 0 {
				return "", fmt.Errorf("%w in %q", ErrBadKeyEncoding, s)
			}
			b = append(b, byte(unhex(s[i+1])<<4|unhex(s[i+2])))
			i += 2
		default:
			b = append(b, c)
		}
	}
	return string(b), nil
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c - 'a' + 10)
	case c >= 'A' && c <= 'F':
		return int(c - 'A' + 10)
	}
	return -1
}

// validToken reports whether s is an RFC 9110 token (a valid header name).
func validToken(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			continue
		}
		if !strings.ContainsRune("!#$%&'*+-.^_`|~", rune(c)) {
			return false
		}
	}
	return true
}

// canonicalHeader returns the canonical MIME form of a valid header name
// ("x-cellmesh-uid" -> "X-Cellmesh-Uid"), as net/textproto does.
func canonicalHeader(s string) string {
	b := []byte(s)
	upper := true
	for i, c := range b {
		if upper && c >= 'a' && c <= 'z' {
			b[i] = c - 'a' + 'A'
		} else if !upper && c >= 'A' && c <= 'Z' {
			b[i] = c - 'A' + 'a'
		}
		upper = c == '-'
	}
	return string(b)
}
