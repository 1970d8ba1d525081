package proxy

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	"go.yaml.in/yaml/v3"
)

// Static is a sidecar configured from files: the sidecar's own file (see
// examples/local/*.yaml), the topology it names, and the certificates. With
// an xds section the control plane delivers the map and endpoints instead
// (RunXDS with XDS), and the file names neither; everything else stays in
// the file.
type Static struct {
	Path   string
	Config Config // without TLS, Logger and Registry, which the caller sets
	// TLSFiles are the CA bundle, certificate and key, relative paths
	// resolved against the file's directory.
	TLSFiles meshtls.Files
	// Reload is how often the files are checked for changes (0: only on
	// SIGHUP).
	Reload    time.Duration
	Topology  string // path of the topology file; empty with XDS
	Map       *routing.ShardMap
	Endpoints []Endpoint
	// XDS, when not nil, is where the map and endpoints come from; Map is
	// nil and Endpoints empty then.
	XDS *XDSConfig
	// Gossip, when not nil, joins the sidecar to the gossip pool
	// (RunGossip); its keys are read from KeyFile.
	Gossip *GossipConfig
}

// staticFile is the YAML form. Durations are strings such as "5s".
type staticFile struct {
	Identity struct {
		Region  string `yaml:"region"`
		Unit    string `yaml:"unit"`
		Service string `yaml:"service"`
	} `yaml:"identity"`
	App    string `yaml:"app"`
	Listen struct {
		Outbound    string `yaml:"outbound"`
		InboundQUIC string `yaml:"inbound_quic"`
		InboundTCP  string `yaml:"inbound_tcp"`
		Admin       string `yaml:"admin"`
	} `yaml:"listen"`
	Topology string `yaml:"topology"`
	TLS      struct {
		CA   string `yaml:"ca"`
		Cert string `yaml:"cert"`
		Key  string `yaml:"key"`
	} `yaml:"tls"`
	Reload duration `yaml:"reload_interval"`
	XDS    *struct {
		Servers   []string `yaml:"servers"`
		Advertise string   `yaml:"advertise"`
	} `yaml:"xds"`
	Gossip *struct {
		Bind      string   `yaml:"bind"`
		Advertise string   `yaml:"advertise"`
		Join      []string `yaml:"join"`
		Profile   string   `yaml:"profile"`
		KeyFile   string   `yaml:"key_file"`
		Insecure  bool     `yaml:"insecure"`
	} `yaml:"gossip"`
	Endpoints []struct {
		Service   string `yaml:"service"`
		Unit      string `yaml:"unit"`
		Address   string `yaml:"address"`
		Transport string `yaml:"transport"`
	} `yaml:"endpoints"`
	Timeouts struct {
		Connect    duration `yaml:"connect"`
		PerTry     duration `yaml:"per_try"`
		Overall    duration `yaml:"overall"`
		Idle       duration `yaml:"idle"`
		StreamIdle duration `yaml:"stream_idle"`
	} `yaml:"timeouts"`
	Limits struct {
		MaxHeaderBytes    int   `yaml:"max_header_bytes"`
		MaxBodyBytes      int64 `yaml:"max_body_bytes"`
		MaxStreamsPerPeer int   `yaml:"max_streams_per_peer"`
	} `yaml:"limits"`
	Retries            int      `yaml:"retries"`
	MisrouteCorrection bool     `yaml:"misroute_correction"`
	DrainTimeout       duration `yaml:"drain_timeout"`
	EjectTime          duration `yaml:"eject_time"`
}

// duration is a time.Duration written as "5s" in YAML.
type duration time.Duration

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: want a duration such as \"5s\"", n.Line)
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (want a number with a unit, such as \"500ms\" or \"5s\")", n.Line, n.Value)
	}
	*d = duration(v)
	return nil
}

// maxStaticFile bounds the sidecar's own file.
const maxStaticFile = 4 << 20

// LoadStatic reads a sidecar configuration file and the topology it names,
// checks both, and returns every problem found at once.
func LoadStatic(path string) (*Static, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read sidecar config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStaticFile+1))
	if err != nil {
		return nil, fmt.Errorf("read sidecar config %s: %w", path, err)
	}
	if len(data) > maxStaticFile {
		return nil, fmt.Errorf("sidecar config %s is larger than %d MiB", path, maxStaticFile>>20)
	}
	st, err := parseStatic(data, filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("sidecar config %s: %w", path, err)
	}
	st.Path = path
	return st, nil
}

func parseStatic(data []byte, dir string) (*Static, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New("empty file: want a YAML mapping with identity, app, tls, and topology and endpoints or xds")
	}
	var sf staticFile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&sf); err != nil {
		return nil, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, errors.New("more than one YAML document: want exactly one")
	}
	var ps []string
	bad := func(format string, args ...any) { ps = append(ps, fmt.Sprintf(format, args...)) }
	rel := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	st := &Static{
		Config: Config{
			Identity:    Identity{Region: sf.Identity.Region, Unit: sf.Identity.Unit, Service: sf.Identity.Service},
			App:         sf.App,
			Outbound:    sf.Listen.Outbound,
			InboundQUIC: sf.Listen.InboundQUIC,
			InboundTCP:  sf.Listen.InboundTCP,
			Admin:       sf.Listen.Admin,
			Timeouts: Timeouts{Connect: time.Duration(sf.Timeouts.Connect), PerTry: time.Duration(sf.Timeouts.PerTry),
				Overall: time.Duration(sf.Timeouts.Overall), Idle: time.Duration(sf.Timeouts.Idle),
				StreamIdle: time.Duration(sf.Timeouts.StreamIdle)},
			Limits: Limits{MaxHeaderBytes: sf.Limits.MaxHeaderBytes, MaxBodyBytes: sf.Limits.MaxBodyBytes,
				MaxStreamsPerPeer: sf.Limits.MaxStreamsPerPeer},
			Retries:            sf.Retries,
			MisrouteCorrection: sf.MisrouteCorrection,
			DrainTimeout:       time.Duration(sf.DrainTimeout),
			EjectTime:          time.Duration(sf.EjectTime),
		},
		TLSFiles: meshtls.Files{CA: rel(sf.TLS.CA), Cert: rel(sf.TLS.Cert), Key: rel(sf.TLS.Key)},
		Reload:   time.Duration(sf.Reload),
		Topology: rel(sf.Topology),
	}
	if sf.Identity.Region == "" || sf.Identity.Unit == "" || sf.Identity.Service == "" {
		bad("identity: region, unit and service are all required")
	}
	if sf.App == "" {
		bad("app: the local app's address is required, such as 127.0.0.1:8080")
	}
	if sf.TLS.CA == "" || sf.TLS.Cert == "" || sf.TLS.Key == "" {
		bad("tls: ca, cert and key are all required (cellmesh certs init and issue make them)")
	}
	if st.Reload < 0 {
		bad("reload_interval is negative")
	}
	for i, e := range sf.Endpoints {
		st.Endpoints = append(st.Endpoints, Endpoint{Service: e.Service, Unit: e.Unit, Address: e.Address, Transport: Transport(e.Transport)})
		ep := st.Endpoints[i]
		if ep.Transport == "" {
			ep.Transport = QUIC
		}
		if err := ep.validate(); err != nil {
			bad("endpoints[%d]: %v", i, err)
		}
	}
	if sf.XDS != nil {
		x := &XDSConfig{Servers: sf.XDS.Servers, Advertise: Transport(sf.XDS.Advertise)}
		ps = append(ps, x.problems()...)
		if x.Advertise == "" {
			x.Advertise = QUIC
		}
		name, addr := "inbound_quic", cmp.Or(sf.Listen.InboundQUIC, DefaultInboundQUIC)
		if x.Advertise == H2 {
			name, addr = "inbound_tcp", cmp.Or(sf.Listen.InboundTCP, Off)
		}
		if addr == Off {
			bad("xds: advertise %s registers the %s listener, which is off: set listen.%s", x.Advertise, name, name)
		} else if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().IsUnspecified() {
			bad("xds: advertise %s registers listen.%s %s, an address other sidecars cannot dial: listen on the address they reach this one at", x.Advertise, name, addr)
		}
		if sf.Topology != "" {
			bad("topology: not allowed with xds: the control plane delivers the shard map")
		}
		if len(sf.Endpoints) > 0 {
			bad("endpoints: not allowed with xds: the control plane delivers the endpoints")
		}
		st.XDS, st.Topology, st.Endpoints = x, "", nil
	} else if sf.Topology == "" {
		bad("topology: the path of the topology file is required (or an xds section, for the control plane to deliver it)")
	} else {
		t, err := topofile.Load(st.Topology)
		if err != nil {
			bad("%v", err)
		} else if st.Map, err = routing.Compile(t); err != nil {
			bad("topology %s: %v", st.Topology, err)
		}
	}
	if g := sf.Gossip; g != nil {
		gc := &GossipConfig{
			Member:    failover.Config{Bind: g.Bind, Advertise: g.Advertise, Join: g.Join, Insecure: g.Insecure},
			Advertise: QUIC,
			KeyFile:   rel(g.KeyFile),
			Reload:    st.Reload,
		}
		if st.XDS != nil {
			gc.Advertise = st.XDS.Advertise
		}
		if p, err := failover.ParseProfile(g.Profile); err != nil {
			bad("gossip: %v", err)
		} else {
			gc.Member.Profile = p
		}
		if g.Bind == "" {
			bad("gossip: bind is required (ip:port, UDP and TCP)")
		} else if _, err := netip.ParseAddrPort(g.Bind); err != nil {
			bad("gossip: bind %q: want ip:port", g.Bind)
		}
		switch {
		case g.KeyFile != "" && g.Insecure:
			bad("gossip: key_file and insecure exclude each other")
		case g.KeyFile == "" && !g.Insecure:
			bad("gossip: key_file is required (cellmesh gossip-key > gossip.key), or insecure: true on a development machine")
		case g.KeyFile != "":
			keys, err := failover.ReadKeyFile(gc.KeyFile)
			if err != nil {
				bad("gossip: %v", err)
			}
			gc.Member.Keys = keys
		}
		st.Gossip = gc
	}
	if st.Map != nil {
		if _, ok := st.Map.Unit(sf.Identity.Unit); sf.Identity.Unit != "" && !ok {
			bad("identity: unit %s is not in the topology %s", sf.Identity.Unit, st.Topology)
		} else if ok {
			if u, _ := st.Map.Unit(sf.Identity.Unit); u.Region != sf.Identity.Region {
				bad("identity: unit %s is in region %s in the topology, not %s", u.Name, u.Region, sf.Identity.Region)
			}
		}
		for i, e := range st.Endpoints {
			if _, ok := st.Map.Unit(e.Unit); !ok {
				bad("endpoints[%d]: unit %s is not in the topology", i, e.Unit)
			}
		}
	}
	if len(ps) > 0 {
		return nil, errors.New(strings.Join(ps, "; "))
	}
	if _, err := newEndpointSet(st.Endpoints, 0, nil); err != nil {
		return nil, err
	}
	return st, nil
}

// Apply gives the sidecar the map and endpoints of st. While the map is
// swapped, the endpoints are those of both lists, so a unit the new map
// adds already has its endpoints and one it drops keeps them until the
// map no longer routes there.
func (s *Sidecar) Apply(st *Static) error {
	if st.XDS != nil {
		return errors.New("the file takes the shard map and endpoints from the control plane (xds): run RunXDS instead of Apply")
	}
	both := append([]Endpoint(nil), st.Endpoints...)
	have := map[string]bool{}
	for _, e := range st.Endpoints {
		have[e.key()] = true
	}
	for _, e := range s.endpoints.Load().all {
		if !have[e.key()] {
			both = append(both, e.Endpoint)
		}
	}
	old := s.endpoints.Load()
	if err := s.SetEndpoints(both, 0); err != nil {
		return err
	}
	if err := s.SetMap(st.Map); err != nil {
		s.updateMu.Lock()
		s.endpoints.Store(old) // a refused reload changes nothing
		s.updateMu.Unlock()
		return err
	}
	return s.SetEndpoints(st.Endpoints, 0)
}

// WatchStatic reloads the sidecar's file, its topology and its
// certificates when one of them changes (checked every interval, or at
// once when kick receives) until ctx ends. A file that does not load is
// logged and changes nothing: the sidecar keeps routing with what it has.
// Settings other than the map, the endpoints and the certificates take a
// restart; a change to them is logged. With an xds section the map and
// endpoints come from the control plane: the file is only checked for
// changes that take a restart, and kick still reloads the certificates.
func (s *Sidecar) WatchStatic(ctx context.Context, st *Static, interval time.Duration, kick <-chan struct{}) {
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	watched := func(st *Static) []string {
		if st.XDS != nil {
			return []string{st.Path}
		}
		return []string{st.Path, st.Topology}
	}
	files := watched(st)
	last := stamps(files)
	for {
		forced := false
		select {
		case <-ctx.Done():
			return
		case <-tick:
		case <-kick:
			forced = true
		}
		now := stamps(files)
		if forced {
			if err := s.cfg.TLS.Reload(); err != nil {
				s.log.Error("certificate reload failed; keeping the current certificate", "error", err)
			} else {
				s.log.Info("certificates reloaded", "not_after", s.cfg.TLS.NotAfter())
			}
		}
		if !forced && now == last {
			continue
		}
		last = now
		next, err := LoadStatic(st.Path)
		if err != nil {
			s.log.Error("config reload failed; keeping the current map and endpoints", "error", err)
			s.m.reloads.WithLabelValues("error").Inc()
			continue
		}
		if next.Config != st.Config || next.TLSFiles != st.TLSFiles || next.Reload != st.Reload || !sameXDS(next.XDS, st.XDS) {
			s.log.Warn("settings other than the topology and the endpoints changed in the config file: they take effect after a restart")
		}
		if st.XDS != nil || next.XDS != nil {
			// The control plane keeps the map and the endpoints; a switch
			// between it and files takes a restart (logged above).
			continue
		}
		if err := s.Apply(next); err != nil {
			s.log.Error("config reload refused; keeping the current map and endpoints", "error", err)
			continue
		}
		s.log.Info("config reloaded", "map_version", next.Map.Version(), "endpoints", len(next.Endpoints))
		if next.Topology != st.Topology {
			s.log.Info("now watching the new topology file", "topology", next.Topology)
		}
		// What takes a restart stays as it was; the rest follows the file.
		next.Config, next.TLSFiles, next.Reload = st.Config, st.TLSFiles, st.Reload
		st = next
		files = watched(st)
		last = stamps(files)
	}
}

// sameXDS reports whether two xds sections say the same.
func sameXDS(a, b *XDSConfig) bool {
	if a == nil || b == nil {
		return a == b
	}
	return slices.Equal(a.Servers, b.Servers) && a.Advertise == b.Advertise && a.BackoffMin == b.BackoffMin && a.BackoffMax == b.BackoffMax
}

func stamps(files []string) string {
	var b strings.Builder
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s:%d:%d;", f, fi.ModTime().UnixNano(), fi.Size())
		}
	}
	return b.String()
}
