package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// routeOutput is the JSON that `cellmesh route` prints. Shard is null when the
// route is not user-sharded (gzone, czone).
type routeOutput struct {
	Shard  *int          `json:"shard"`
	Zone   routing.Zone  `json:"zone"`
	Unit   string        `json:"unit"`
	Region string        `json:"region"`
	Epoch  uint64        `json:"epoch"`
	State  routing.State `json:"state"`
	Write  bool          `json:"write"`
	Key    string        `json:"key,omitempty"`
	// LocalFallback: no user key, so the request stays in the --from unit.
	LocalFallback bool `json:"local_fallback,omitempty"`
}

func runRoute(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("route", "cellmesh route --topology FILE --uid ID [--key-header H] [--method M] [--path P] [--from UNIT] [--header 'Name: value']...",
		`Prints, as JSON, where a request goes: its shard, zone, unit, region and
epoch, decided by the topology's key, shard and zone rules exactly as a
sidecar decides it. The user id is sent in the header --key-header; the path
(with an optional ?query) and method pick the zone rule and may carry the key
themselves. Exit 0 with the decision, 1 when the request cannot be routed
(no key, non-numeric key under mod/digits), when --uid is given but the
decision did not read it (another key source came first, or none matched and
the request fell back to --from), or when the topology is invalid.`, stderr)
	topo := fs.String("topology", "", "topology YAML file (required)")
	uid := fs.String("uid", "", "user key to route; sent in the --key-header header")
	keyHeader := fs.String("key-header", "", "header that carries --uid (default: the topology's first header key source, else "+routing.DefaultKeyHeader+")")
	method := fs.String("method", "GET", "HTTP method of the request (an RFC 9110 token)")
	path := fs.String("path", "/", "request path, optionally with ?query")
	from := fs.String("from", "", "unit of the sidecar deciding; needed for czone routes")
	var headers repeatFlag
	fs.Var(&headers, "header", "extra request header 'Name: value' (repeatable), e.g. 'Cookie: uid=42'")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "route", "unexpected argument %q", fs.Arg(0))
	}
	if *topo == "" {
		return usagef(stderr, "route", "--topology is required")
	}
	m, code := loadMap(*topo, "route", stderr)
	if m == nil {
		return code
	}
	req, err := buildRequest(m, *uid, *keyHeader, *method, *path, *from, headers)
	if err != nil {
		return failf(stderr, "route", "%v", err)
	}
	d, err := m.Decide(req)
	switch {
	case errors.Is(err, routing.ErrNoLocalUnit):
		return failf(stderr, "route", "%v: pass --from UNIT, the unit of the sidecar deciding", err)
	case errors.Is(err, routing.ErrNoKey):
		return failf(stderr, "route", "%v; this topology reads the key from %s (--uid goes in the %s header)", err, keySources(m), uidHeader(m, *keyHeader))
	case err != nil:
		return failf(stderr, "route", "%v", err)
	}
	if why := uidNotRead(m, req, d, *uid, *keyHeader); why != "" {
		return failf(stderr, "route", "%s", why)
	}
	out := routeOutput{Zone: d.Zone, Unit: d.Unit, Region: d.Region, Epoch: d.Epoch, State: d.State, Write: d.Write, Key: d.Key, LocalFallback: d.LocalFallback}
	if d.Shard != routing.GlobalShard {
		out.Shard = &d.Shard
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return failf(stderr, "route", "write output: %v", err)
	}
	return exitOK
}

func buildRequest(m *routing.ShardMap, uid, keyHeader, method, path, from string, headers []string) (*routing.Request, error) {
	u, err := url.ParseRequestURI(path)
	if err != nil || !strings.HasPrefix(path, "/") {
		return nil, fmt.Errorf("--path %q is not a request path like /v1/users/42?x=1", path)
	}
	if !isToken(method) {
		return nil, fmt.Errorf("--method %q is not an HTTP method", method)
	}
	if keyHeader != "" && !isToken(keyHeader) {
		return nil, fmt.Errorf("--key-header %q is not a valid HTTP header name", keyHeader)
	}
	if from != "" {
		if _, ok := m.Unit(from); !ok {
			return nil, fmt.Errorf("--from: unit %q is not in the topology", from)
		}
	}
	h := http.Header{}
	for _, line := range headers {
		name, value, ok := strings.Cut(line, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			return nil, fmt.Errorf("--header %q: want 'Name: value'", line)
		}
		h.Add(name, strings.TrimSpace(value))
	}
	if uid != "" {
		h.Add(textproto.CanonicalMIMEHeaderKey(uidHeader(m, keyHeader)), uid)
	}
	return &routing.Request{Method: strings.ToUpper(method), Path: u.Path, RawQuery: u.RawQuery, Header: h, LocalUnit: from}, nil
}

// isToken reports whether s is an RFC 9110 token, the syntax of a method:
// one or more letters, digits and !#$%&'*+-.^_`|~.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// uidNotRead returns why --uid did not decide the route, or "" when it did
// or when the route needs no key (gzone, czone): the request fell back to
// the local unit, or another key source came first.
func uidNotRead(m *routing.ShardMap, req *routing.Request, d routing.Decision, uid, keyHeader string) string {
	if uid == "" || (d.Zone != routing.KindRZone && !d.LocalFallback) {
		return ""
	}
	header := uidHeader(m, keyHeader)
	var why string
	if d.LocalFallback {
		why = fmt.Sprintf("the request fell back to the local unit %s", d.Unit)
	} else {
		key, src, err := m.Key(req)
		if err != nil || (src.Kind == routing.KeyHeader && strings.EqualFold(src.Name, header)) {
			return ""
		}
		why = fmt.Sprintf("the key %q came from %s", key, src)
	}
	return fmt.Sprintf("--uid %q was not read: it was sent in header %s, and this topology reads the user key from %s (first match wins); %s. Send the key where the topology reads it (--key-header, --header or --path)",
		uid, header, keySources(m), why)
}

// uidHeader is the header --uid is sent in: --key-header, else the
// topology's first header key source, else x-cellmesh-uid.
func uidHeader(m *routing.ShardMap, keyHeader string) string {
	if keyHeader != "" {
		return keyHeader
	}
	for _, k := range m.Topology().Keys {
		if k.Kind == routing.KeyHeader {
			return k.Name
		}
	}
	return routing.DefaultKeyHeader
}

func keySources(m *routing.ShardMap) string {
	keys := m.Topology().Keys
	if len(keys) == 0 {
		return "header " + routing.DefaultKeyHeader
	}
	var out []string
	for _, k := range keys {
		out = append(out, k.String())
	}
	return strings.Join(out, ", ")
}

// loadMap loads and compiles a topology; on failure it prints every problem
// and returns the exit code.
func loadMap(path, cmd string, stderr io.Writer) (*routing.ShardMap, int) {
	t, err := topofile.Load(path)
	if err != nil {
		return nil, failf(stderr, cmd, "%v", err)
	}
	m, err := routing.Compile(t)
	if err != nil {
		fmt.Fprintf(stderr, "cellmesh %s: %s: %v\n", cmd, path, err)
		fmt.Fprintf(stderr, "run 'cellmesh topology validate %s' for the list\n", path)
		return nil, exitError
	}
	return m, exitOK
}
