package proxy

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Every sidecar file of the local example loads, and New accepts what it
// gives once the certificates are added.
func TestLoadStaticExamples(t *testing.T) {
	files, err := filepath.Glob("../examples/local/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t, trustDomain)
	loaded := 0
	for _, f := range files {
		if filepath.Base(f) == "topology.yaml" {
			continue
		}
		loaded++
		unit := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(unit, func(t *testing.T) {
			st, err := LoadStatic(f)
			if err != nil {
				t.Fatal(err)
			}
			c := st.Config
			if c.Identity.Unit != unit || c.Identity.Service != "echo" || !strings.HasPrefix(unit, c.Identity.Region) {
				t.Errorf("identity %+v, want unit %s of service echo", c.Identity, unit)
			}
			if st.Path != f || st.Map == nil || st.Map.Version() != 1 || len(st.Endpoints) != 4 {
				t.Errorf("path %q, map %v, %d endpoints; want %q, version 1, 4", st.Path, st.Map, len(st.Endpoints), f)
			}
			if want := filepath.Join("../examples/local", "topology.yaml"); st.Topology != want {
				t.Errorf("topology %q, want %q (relative to the file)", st.Topology, want)
			}
			if want := filepath.Join("../examples/local", "certs", "ca.pem"); st.TLSFiles.CA != want {
				t.Errorf("tls ca %q, want %q (relative to the file)", st.TLSFiles.CA, want)
			}
			if c.Timeouts.Connect != 2*time.Second || c.Timeouts.PerTry != 15*time.Second || c.Timeouts.Overall != 30*time.Second ||
				c.DrainTimeout != 10*time.Second || st.Reload != 5*time.Second || !c.MisrouteCorrection {
				t.Errorf("timeouts %+v drain %s reload %s misroute %v: not what the file says", c.Timeouts, c.DrainTimeout, st.Reload, c.MisrouteCorrection)
			}
			transports := map[string]Transport{}
			for _, e := range st.Endpoints {
				transports[e.Unit] = e.Transport
			}
			if transports["eu-west-2"] != H2 || transports["us-east-1"] != QUIC {
				t.Errorf("endpoint transports %v, want eu-west-2 over h2 and the others over quic", transports)
			}

			c.TLS = ca.issue(meshID(c.Identity), time.Hour, nil)
			sc, err := New(c)
			if err != nil {
				t.Fatalf("New with the file's config: %v", err)
			}
			defer sc.Close()
			if err := sc.Apply(st); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if sc.Map().Version() != 1 || len(sc.Status().Endpoints) != 4 {
				t.Errorf("after Apply: map version %d, %d endpoints", sc.Map().Version(), len(sc.Status().Endpoints))
			}
		})
	}
	if loaded != 4 {
		t.Errorf("found %d sidecar files in examples/local, want 4", loaded)
	}
}

// staticBase is a valid sidecar file, next to a copy of the local topology.
const staticBase = `identity: {region: us-east, unit: us-east-1, service: echo}
app: 127.0.0.1:18101
listen:
  outbound: 127.0.0.1:15101
  inbound_quic: 127.0.0.1:15201
  admin: 127.0.0.1:15401
topology: topology.yaml
tls: {ca: certs/ca.pem, cert: certs/us-east-1-echo.pem, key: certs/us-east-1-echo-key.pem}
reload_interval: 5s
timeouts: {connect: 2s, per_try: 15s, overall: 30s}
endpoints:
  - {service: echo, unit: us-east-1, address: 127.0.0.1:15201, transport: quic}
  - {service: echo, unit: us-east-2, address: 127.0.0.1:15202}
  - {service: echo, unit: eu-west-2, address: 127.0.0.1:15304, transport: h2}
`

// Malformed sidecar files are refused with an error that names the problem.
func TestLoadStaticErrors(t *testing.T) {
	topo, err := os.ReadFile("../examples/local/topology.yaml")
	if err != nil {
		t.Fatal(err)
	}
	edit := func(old, new string) func(t *testing.T) string {
		return func(t *testing.T) string {
			if !strings.Contains(staticBase, old) {
				t.Fatalf("the base file has no %q", old)
			}
			return strings.Replace(staticBase, old, new, 1)
		}
	}
	text := func(s string) func(*testing.T) string { return func(*testing.T) string { return s } }
	for _, tc := range []struct {
		name string
		file func(t *testing.T) string
		want []string
	}{
		{"valid", text(staticBase), nil},
		{"unknown-key", edit("reload_interval: 5s", "reload_interval: 5s\nretry_budget: 3"), []string{"retry_budget"}},
		{"unknown-nested-key", edit("connect: 2s", "conect: 2s"), []string{"conect"}},
		{"bad-duration", edit("connect: 2s", "connect: 5 seconds"), []string{`"5 seconds" is not a duration`}},
		{"duration-not-scalar", edit("connect: 2s", "connect: [2s]"), []string{"want a duration"}},
		{"negative-reload", edit("reload_interval: 5s", "reload_interval: -5s"), []string{"reload_interval is negative"}},
		{"bad-transport", edit("transport: h2", "transport: tcp"), []string{"endpoints[2]", `transport "tcp" is unknown`}},
		{"bad-endpoint-address", edit("127.0.0.1:15202", "localhost:15202"), []string{"endpoints[1]", `"localhost:15202"`}},
		{"endpoint-unit-unknown", edit("unit: eu-west-2", "unit: us-west-9"), []string{"endpoints[2]", "unit us-west-9 is not in the topology"}},
		{"endpoint-twice", edit("127.0.0.1:15202", "127.0.0.1:15201"), []string{"listed twice"}},
		{"missing-identity", edit("identity: {region: us-east, unit: us-east-1, service: echo}\n", ""), []string{"identity: region, unit and service are all required"}},
		{"missing-service", edit(", service: echo}", "}"), []string{"identity: region, unit and service are all required"}},
		{"identity-unknown-unit", edit("unit: us-east-1, service", "unit: us-west-9, service"), []string{"identity: unit us-west-9 is not in the topology"}},
		{"identity-wrong-region", edit("region: us-east, unit: us-east-1", "region: eu-west, unit: us-east-1"), []string{"unit us-east-1 is in region us-east in the topology, not eu-west"}},
		{"missing-app", edit("app: 127.0.0.1:18101\n", ""), []string{"app: the local app's address is required"}},
		{"missing-tls-key", edit(", key: certs/us-east-1-echo-key.pem", ""), []string{"tls: ca, cert and key are all required"}},
		{"two-documents", text(staticBase + "---\n" + staticBase), []string{"more than one YAML document"}},
		{"empty", text(""), []string{"empty file"}},
		{"blank", text("\n  \n\t\n"), []string{"empty file"}},
		{"not-a-mapping", text("- 1\n- 2\n"), []string{"sidecar config"}},
		{"missing-topology-key", edit("topology: topology.yaml\n", ""), []string{"topology: the path of the topology file is required"}},
		{"missing-topology-file", edit("topology: topology.yaml", "topology: nosuch.yaml"), []string{"nosuch.yaml"}},
		{"several-problems", text(strings.Replace(strings.Replace(staticBase, "app: 127.0.0.1:18101\n", "", 1), "transport: h2", "transport: tcp", 1)), []string{"app: the local app's address is required", `transport "tcp" is unknown`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "topology.yaml"), topo, 0o600); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "sidecar.yaml")
			if err := os.WriteFile(path, []byte(tc.file(t)), 0o600); err != nil {
				t.Fatal(err)
			}
			st, err := LoadStatic(path)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("the valid base file: %v", err)
				}
				if st.Endpoints[1].Transport != "" && st.Endpoints[1].Transport != QUIC {
					t.Errorf("endpoint without transport: %q, want quic", st.Endpoints[1].Transport)
				}
				return
			}
			if err == nil {
				t.Fatalf("LoadStatic accepted it, want an error naming %q", tc.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error does not name the file %s: %v", path, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not say %q: %v", w, err)
				}
			}
		})
	}
	if _, err := LoadStatic(filepath.Join(t.TempDir(), "nosuch.yaml")); err == nil || !strings.Contains(err.Error(), "nosuch.yaml") {
		t.Errorf("a missing sidecar file: error %v, want one naming it", err)
	}
}

// New refuses a bad Config with every problem at once.
func TestNewConfigErrors(t *testing.T) {
	ca := newTestCA(t, trustDomain)
	id := Identity{Region: "us-east", Unit: "us-east-1", Service: "echo"}
	store := ca.issue(meshID(id), time.Hour, nil)
	valid := func() Config {
		return Config{Identity: id, App: "127.0.0.1:18101", TLS: store, Outbound: "127.0.0.1:0", InboundQUIC: "127.0.0.1:0", Admin: Off}
	}
	for _, tc := range []struct {
		name   string
		change func(*Config)
		want   []string
	}{
		{"valid", func(*Config) {}, nil},
		{"empty", func(c *Config) { *c = Config{} }, []string{"identity needs region, unit and service", "tls: no certificate store", "app: the local app's address is required"}},
		{"negative-timeouts", func(c *Config) {
			c.Timeouts = Timeouts{Connect: -time.Second, PerTry: -time.Second, Idle: -time.Millisecond}
			c.DrainTimeout, c.EjectTime = -1, -1
		}, []string{"timeouts.connect is negative", "timeouts.per_try is negative", "timeouts.idle is negative", "drain_timeout is negative", "eject_time is negative"}},
		{"per-try-over-overall", func(c *Config) { c.Timeouts.PerTry, c.Timeouts.Overall = 10*time.Second, 5*time.Second },
			[]string{"timeouts.per_try (10s) is longer than timeouts.overall (5s)"}},
		{"per-try-over-default-overall", func(c *Config) { c.Timeouts.PerTry = time.Minute },
			[]string{"timeouts.per_try (1m0s) is longer than timeouts.overall (30s)"}},
		{"inbound-off", func(c *Config) { c.InboundQUIC, c.InboundTCP = Off, Off }, []string{"both inbound_quic and inbound_tcp are off"}},
		{"bad-addresses", func(c *Config) {
			c.Outbound, c.InboundQUIC, c.InboundTCP, c.Admin, c.App = "localhost:15001", "15443", "127.0.0.1", "[::1]:x", "nohost"
		}, []string{`outbound address "localhost:15001"`, `inbound_quic address "15443"`, `inbound_tcp address "127.0.0.1"`, `admin address "[::1]:x"`, `app address "nohost"`}},
		{"outbound-off", func(c *Config) { c.Outbound = Off }, []string{`outbound address "off"`}},
		{"limits", func(c *Config) {
			c.Limits = Limits{MaxHeaderBytes: 100, MaxBodyBytes: -1, MaxStreamsPerPeer: 1 << 20}
		}, []string{"limits.max_header_bytes 100", "limits.max_body_bytes -1 is negative", "limits.max_streams_per_peer 1048576"}},
		{"identity-not-the-certificate", func(c *Config) { c.Identity.Unit = "us-east-2" }, []string{"tls: the certificate is for spiffe://cellmesh.test/region/us-east/unit/us-east-1/service/echo"}},
		{"everything", func(c *Config) {
			c.Timeouts.Connect = -1
			c.Timeouts.PerTry, c.Timeouts.Overall = 3*time.Second, time.Second
			c.InboundQUIC, c.InboundTCP = Off, Off
			c.Outbound = "bad"
		}, []string{"timeouts.connect is negative", "timeouts.per_try (3s) is longer", "both inbound_quic and inbound_tcp are off", `outbound address "bad"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid()
			tc.change(&cfg)
			before := cfg
			sc, err := New(cfg)
			if cfg != before {
				t.Errorf("New changed the caller's config: %+v, was %+v", cfg, before)
			}
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				sc.Close()
				return
			}
			if err == nil {
				sc.Close()
				t.Fatalf("New accepted it, want problems %q", tc.want)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("error %T %v, want *ConfigError", err, err)
			}
			if len(ce.Problems) != len(tc.want) {
				t.Errorf("%d problems, want %d: %q", len(ce.Problems), len(tc.want), ce.Problems)
			}
			for _, w := range tc.want {
				found := false
				for _, p := range ce.Problems {
					found = found || strings.Contains(p, w)
				}
				if !found {
					t.Errorf("no problem says %q: %q", w, ce.Problems)
				}
			}
		})
	}
}

// FuzzParseStatic: no sidecar file crashes the parser, and one it accepts
// has everything the sidecar needs.
func FuzzParseStatic(f *testing.F) {
	for _, u := range []string{"us-east-1", "eu-west-2"} {
		data, err := os.ReadFile("../examples/local/" + u + ".yaml")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("identity: {region: a}\napp: 1\n"))
	f.Add([]byte("timeouts: {connect: 5 seconds}\n"))
	f.Add([]byte("endpoints: [{service: echo, unit: us-east-1, address: '[::1]:1', transport: h3}]\n"))
	f.Add([]byte(staticXDS))
	f.Add([]byte(strings.Replace(staticXDS, "advertise: quic", "advertise: h2", 1)))
	dir := f.TempDir()
	topo, err := os.ReadFile("../examples/local/topology.yaml")
	if err != nil {
		f.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "topology.yaml"), topo, 0o600); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := parseStatic(data, dir)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if (st.Map == nil) == (st.XDS == nil) || st.Config.App == "" || st.Config.Identity.Unit == "" || st.TLSFiles.Cert == "" {
			t.Fatalf("accepted a file without app, identity or certificate, or without exactly one of a map and xds: %+v", st)
		}
		if st.XDS != nil && (len(st.XDS.Servers) == 0 || len(st.Endpoints) > 0 || st.Topology != "") {
			t.Fatalf("accepted an xds section without servers, or beside endpoints or a topology: %+v", st)
		}
	})
}

// staticXDS is a valid sidecar file whose map and endpoints come from the
// control plane.
const staticXDS = `identity: {region: us-east, unit: us-east-1, service: echo}
app: 127.0.0.1:18101
listen:
  outbound: 127.0.0.1:15101
  inbound_quic: 127.0.0.1:15201
  admin: 127.0.0.1:15401
tls: {ca: certs/ca.pem, cert: certs/us-east-1-echo.pem, key: certs/us-east-1-echo-key.pem}
xds:
  servers: [127.0.0.1:7701, "[::1]:7711", cp-3.example:7721]
  advertise: quic
`

// The xds section: parsed, checked, and exclusive of a topology and
// endpoints; errors name the problem.
func TestLoadStaticXDS(t *testing.T) {
	edit := func(pairs ...string) string {
		s := staticXDS
		for i := 0; i < len(pairs); i += 2 {
			if !strings.Contains(s, pairs[i]) {
				t.Fatalf("the xds file has no %q", pairs[i])
			}
			s = strings.Replace(s, pairs[i], pairs[i+1], 1)
		}
		return s
	}
	for _, tc := range []struct {
		name string
		file string
		want []string // nil: valid
	}{
		{"valid", staticXDS, nil},
		{"advertise-default", edit("  advertise: quic\n", ""), nil},
		{"advertise-h2", edit("advertise: quic", "advertise: h2", "  admin:", "  inbound_tcp: 127.0.0.1:15301\n  admin:"), nil},
		{"with-topology", edit("xds:", "topology: topology.yaml\nxds:"), []string{"topology: not allowed with xds"}},
		{"with-endpoints", edit("xds:", "endpoints: [{service: echo, unit: us-east-1, address: 127.0.0.1:15201}]\nxds:"), []string{"endpoints: not allowed with xds"}},
		{"no-servers", edit("  servers: [127.0.0.1:7701, \"[::1]:7711\", cp-3.example:7721]\n", ""), []string{"xds: servers: at least one control-plane address"}},
		{"empty-section", edit("  servers: [127.0.0.1:7701, \"[::1]:7711\", cp-3.example:7721]\n  advertise: quic\n", " {}\n"), []string{"xds: servers: at least one"}},
		{"server-without-port", edit("cp-3.example:7721", "cp-3.example"), []string{`xds: servers[2] "cp-3.example": want host:port`}},
		{"server-bad-port", edit("127.0.0.1:7701", "127.0.0.1:77010"), []string{`xds: servers[0] "127.0.0.1:77010": port "77010"`}},
		{"server-twice", edit("cp-3.example:7721", "127.0.0.1:7701"), []string{`xds: servers[2] "127.0.0.1:7701" is listed twice`}},
		{"advertise-unknown", edit("advertise: quic", "advertise: tcp"), []string{`xds: advertise "tcp": want quic`}},
		{"advertise-h2-without-tcp", edit("advertise: quic", "advertise: h2"), []string{"xds: advertise h2 registers the inbound_tcp listener, which is off"}},
		{"advertise-quic-off", edit("inbound_quic: 127.0.0.1:15201", "inbound_quic: \"off\"\n  inbound_tcp: 127.0.0.1:15301"), []string{"xds: advertise quic registers the inbound_quic listener, which is off"}},
		{"advertise-unspecified", edit("inbound_quic: 127.0.0.1:15201", "inbound_quic: 0.0.0.0:15201"), []string{"listen.inbound_quic 0.0.0.0:15201, an address other sidecars cannot dial"}},
		{"unknown-key", edit("  advertise: quic", "  advertise: quic\n  backof: 1s"), []string{"backof"}},
		{"not-a-mapping", edit("  servers: [127.0.0.1:7701, \"[::1]:7711\", cp-3.example:7721]\n  advertise: quic\n", " [127.0.0.1:7701]\n"), []string{"sidecar config"}},
		{"several", edit("advertise: quic", "advertise: udp", "xds:", "topology: topology.yaml\nxds:"), []string{`advertise "udp"`, "topology: not allowed with xds"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "sidecar.yaml")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			st, err := LoadStatic(path)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if st.XDS == nil || st.Map != nil || st.Topology != "" || len(st.Endpoints) != 0 {
					t.Fatalf("xds %+v, map %v, topology %q, %d endpoints: want xds alone", st.XDS, st.Map, st.Topology, len(st.Endpoints))
				}
				if want := []string{"127.0.0.1:7701", "[::1]:7711", "cp-3.example:7721"}; !slices.Equal(st.XDS.Servers, want) {
					t.Errorf("servers %q, want %q", st.XDS.Servers, want)
				}
				want := QUIC
				if strings.Contains(tc.file, "advertise: h2") {
					want = H2
				}
				if st.XDS.Advertise != want {
					t.Errorf("advertise %q, want %q", st.XDS.Advertise, want)
				}
				return
			}
			if err == nil {
				t.Fatalf("LoadStatic accepted it, want an error naming %q", tc.want)
			}
			for _, w := range append([]string{path}, tc.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not say %q: %v", w, err)
				}
			}
		})
	}
}

// In xDS mode the file gives no map: Apply refuses it, and WatchStatic
// loads no topology, logs a change that takes a restart, and still reloads
// the certificates on a kick.
func TestWatchStaticXDS(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sidecar.yaml")
	if err := os.WriteFile(path, []byte(staticXDS), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := LoadStatic(path)
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t, trustDomain)
	logs := &syncBuffer{}
	c := st.Config
	c.Outbound, c.InboundQUIC, c.Admin = "127.0.0.1:0", "127.0.0.1:0", Off
	c.TLS = ca.issue(meshID(c.Identity), time.Hour, nil)
	c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	sc, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if err := sc.Apply(st); err == nil || !strings.Contains(err.Error(), "RunXDS") {
		t.Errorf("Apply of an xds file: %v, want a refusal pointing at RunXDS", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	kick := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc.WatchStatic(ctx, st, 0, kick)
	}()
	defer func() {
		cancel()
		<-done
	}()
	kicked := func() {
		t.Helper()
		select {
		case kick <- struct{}{}:
		case <-time.After(10 * time.Second):
			t.Fatal("WatchStatic does not take a kick")
		}
	}
	kicked()
	waitFor(t, 10*time.Second, func() bool { return logs.contains("certificates reloaded") }, "the certificates reloaded")
	if err := os.WriteFile(path, []byte(strings.Replace(staticXDS, "127.0.0.1:7701", "127.0.0.1:7702", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	kicked()
	waitFor(t, 10*time.Second, func() bool { return logs.contains("take effect after a restart") }, "the changed servers logged")
	if logs.contains("config reload failed") || logs.contains("config reload refused") || sc.Map() != nil {
		t.Errorf("WatchStatic in xds mode tried to load a map:\n%s", logs.String())
	}
}
