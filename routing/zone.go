package routing

import (
	"fmt"
	"strings"
)

// Zone is the kind of data a route touches, which decides where it goes:
// rzone -> the shard's primary unit, gzone -> the global writer unit,
// czone -> a czone unit in the local region (or the local unit).
type Zone = Kind

// ZoneRule maps requests to a zone. A rule matches when the method is one of
// Methods (any method when empty) and the path starts with PathPrefix or
// matches Path. Rules are tried in order; the first match wins.
type ZoneRule struct {
	Methods    []string
	PathPrefix string
	// Path is a pattern of segments where '*' matches any one segment; it
	// matches the beginning of the path.
	Path string
	Zone Zone
	// Write, when set, says whether the matched requests are writes. When
	// nil, the method decides: GET, HEAD, OPTIONS and TRACE are reads.
	Write *bool
}

// ZoneRules are the ordered rules and the zone of requests no rule matches.
type ZoneRules struct {
	Rules []ZoneRule
	// Default is the zone when no rule matches; empty means rzone.
	Default Zone
}

func (z ZoneRules) defaultZone() Zone {
	if z.Default == "" {
		return KindRZone
	}
	return z.Default
}

type zoneRule struct {
	methods []string
	prefix  string
	pattern []string
	zone    Zone
	write   int8 // -1 by method, 0 read, 1 write
}

func (z ZoneRules) validate(ps *problems) {
	if !z.defaultZone().valid() {
		ps.add("zones", "default zone %q is unknown (want rzone, gzone or czone)", z.Default)
	}
	for i, r := range z.Rules {
		if _, err := compileZoneRule(r); err != nil {
			ps.add(fmt.Sprintf("zones.rules[%d]", i), "%v", err)
		}
	}
}

func compileZoneRule(r ZoneRule) (zoneRule, error) {
	zr := zoneRule{prefix: r.PathPrefix, zone: r.Zone, write: -1}
	if !r.Zone.valid() {
		return zr, fmt.Errorf("zone %q is unknown (want rzone, gzone or czone)", r.Zone)
	}
	if r.PathPrefix != "" && r.Path != "" {
		return zr, fmt.Errorf("give path_prefix or path, not both")
	}
	if r.PathPrefix != "" && !strings.HasPrefix(r.PathPrefix, "/") {
		return zr, fmt.Errorf("path_prefix %q must start with '/'", r.PathPrefix)
	}
	if r.Path != "" {
		segs, err := parsePattern(r.Path, false)
		if err != nil {
			return zr, err
		}
		zr.pattern = segs
		// The literal segments before the first '*' must start the path:
		// check them as a prefix first, which rejects most paths cheaply.
		for _, seg := range segs {
			if seg == "*" {
				break
			}
			zr.prefix += "/" + seg
		}
	}
	for _, m := range r.Methods {
		if !validToken(m) {
			return zr, fmt.Errorf("method %q is not a valid HTTP method", m)
		}
		zr.methods = append(zr.methods, strings.ToUpper(m))
	}
	if r.Write != nil {
		zr.write = 0
		if *r.Write {
			zr.write = 1
		}
	}
	return zr, nil
}

// match reports whether the rule matches req. upper says whether
// req.Method is already upper case, as nearly every method is.
func (r *zoneRule) match(req *Request, upper bool) bool {
	if r.prefix != "" && !strings.HasPrefix(req.Path, r.prefix) {
		return false
	}
	if len(r.methods) > 0 {
		ok := false
		for _, m := range r.methods {
			if m == req.Method || !upper && strings.EqualFold(m, req.Method) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if r.pattern != nil {
		if _, ok := matchPattern(r.pattern, req.Path, -1); !ok {
			return false
		}
	}
	return true
}

func isUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 'a' && s[i] <= 'z' {
			return false
		}
	}
	return true
}

// IsWriteMethod reports whether a method writes by default: every method but
// GET, HEAD, OPTIONS and TRACE.
func IsWriteMethod(m string) bool {
	switch m {
	case "GET", "HEAD", "OPTIONS", "TRACE", "":
		return false
	case "POST", "PUT", "PATCH", "DELETE":
		return true
	}
	return !(strings.EqualFold(m, "GET") || strings.EqualFold(m, "HEAD") || strings.EqualFold(m, "OPTIONS") || strings.EqualFold(m, "TRACE"))
}
