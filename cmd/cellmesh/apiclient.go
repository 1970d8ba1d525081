package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cellmesh/cellmesh/controlplane"
)

// apiEnv holds the default API address.
const apiEnv = "CELLMESH_API"

// apiFlags are the flags of every command that talks to the API.
type apiFlags struct {
	api, token, tokenFile string
	json                  bool
	timeout               time.Duration
}

func addAPIFlags(fs *flag.FlagSet) *apiFlags {
	f := &apiFlags{}
	def := os.Getenv(apiEnv)
	if def == "" {
		def = "http://127.0.0.1:7700"
	}
	fs.StringVar(&f.api, "api", def, "control-plane API address (default $"+apiEnv+" or http://127.0.0.1:7700)")
	fs.StringVar(&f.token, "token", "", "API bearer token (default $"+tokenEnv+")")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the API bearer token")
	fs.BoolVar(&f.json, "json", false, "print the API's JSON instead of a table")
	fs.DurationVar(&f.timeout, "timeout", 15*time.Second, "give up after this long")
	return f
}

// rawYAML is a request body sent as it is, as YAML.
type rawYAML []byte

// httpError is an API answer other than 200.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.msg, e.status) }

// call sends a request to the API and decodes the answer into out (raw
// keeps the bytes when out is nil).
func (f *apiFlags) call(method, path string, body, out any) ([]byte, error) {
	token := f.token
	if token == "" && f.tokenFile != "" {
		t, err := readToken(f.tokenFile)
		if err != nil {
			return nil, err
		}
		token = t
	}
	if token == "" {
		token = strings.TrimSpace(os.Getenv(tokenEnv))
	}
	var rd io.Reader
	ctype := "application/json"
	if y, ok := body.(rawYAML); ok {
		rd, ctype = bytes.NewReader(y), "application/yaml"
	} else if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(data)
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	base := f.api
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(base, "/")+path, rd)
	if err != nil {
		return nil, fmt.Errorf("--api %q: %v", f.api, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", ctype)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("the control plane at %s did not answer: %v (is it running? --api or $%s)", f.api, err, apiEnv)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("read the answer of %s: %v", f.api, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(data))
		}
		return nil, &httpError{status: resp.StatusCode, msg: e.Error}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return nil, fmt.Errorf("the answer of %s %s is not what this cellmesh expects: %v", method, path, err)
		}
	}
	return data, nil
}

// apiFail prints an API failure; a refused change (409) exits exitRefused.
func apiFail(stderr io.Writer, cmd string, err error) int {
	failf(stderr, cmd, "%v", err)
	var he *httpError
	if errors.As(err, &he) && he.status == http.StatusConflict {
		return exitRefused
	}
	return exitError
}

func printJSON(w io.Writer, data []byte) {
	var buf bytes.Buffer
	if json.Indent(&buf, data, "", "  ") != nil {
		buf.Reset()
		buf.Write(data)
	}
	w.Write(bytes.TrimSpace(buf.Bytes()))
	fmt.Fprintln(w)
}

// topologyUnits is the part of GET /v1/topology that status shows.
type topologyUnits struct {
	Version string `json:"version"`
	Shards  int    `json:"shards"`
	Units   []struct {
		Name, Region, Kind string
	} `json:"units"`
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("status", "cellmesh status [--api URL] [--token T] [--json]",
		`Shows the control plane: its replicas (leader, voters, addresses), the
state's raft index and map version, and per unit the shards it owns, the
sidecars registered in it (and how many gossip finds down), its health
from gossip (up, degraded, suspect, down, unknown) and how long its lease
lasts (on the leader's clock: a unit whose sidecars are all gone, or that
gossip finds suspect or down, is not renewed).`, stderr)
	f := addAPIFlags(fs)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "status", "unexpected argument %q", fs.Arg(0))
	}
	var members controlplane.Members
	mraw, err := f.call("GET", "/v1/members", nil, &members)
	if err != nil {
		return apiFail(stderr, "status", err)
	}
	var shards controlplane.Shards
	sraw, serr := f.call("GET", "/v1/shards", nil, &shards)
	var topo topologyUnits
	traw, terr := f.call("GET", "/v1/topology", nil, &topo)
	if f.json {
		out := map[string]json.RawMessage{"members": mraw}
		if serr == nil && terr == nil {
			out["shards"], out["topology"] = sraw, traw
		}
		data, _ := json.Marshal(out)
		printJSON(stdout, data)
		return exitOK
	}
	leader := members.Leader
	if leader == "" {
		leader = "NONE (no quorum)"
	}
	fmt.Fprintf(stdout, "control plane: leader %s, answered by %s, state index %d", leader, members.Replica, members.Index)
	if serr == nil {
		fmt.Fprintf(stdout, ", map version %d", shards.Version)
	}
	fmt.Fprintln(stdout)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nREPLICA\tREGION\tROLE\tRAFT\tAPI\tXDS")
	for _, r := range members.Replicas {
		role := "follower"
		if r.Leader {
			role = "leader"
		}
		if !r.Voter {
			role += " (non-voter)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, dash(r.Region), role, r.Raft, dash(r.API), dash(r.XDS))
	}
	tw.Flush()
	if serr != nil || terr != nil {
		fmt.Fprintf(stdout, "\nno shard map: %v\n", errors.Join(serr, terr))
		return exitOK
	}
	owned, eps, lease := map[string]int{}, map[string]int{}, map[string]string{}
	for _, l := range members.Leases {
		if left := time.Until(l.EndsAt); left > 0 {
			lease[l.Unit] = left.Round(100 * time.Millisecond).String()
		} else {
			lease[l.Unit] = "ended"
		}
	}
	for _, s := range shards.Shards {
		owned[s.Unit]++
	}
	down := map[string]int{}
	for _, e := range members.Endpoints {
		eps[e.Unit]++
		if e.Down {
			down[e.Unit]++
		}
	}
	g := members.Gossip
	health := map[string]string{}
	for _, u := range g.Units {
		health[u.Unit] = string(u.State)
	}
	tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nUNIT\tREGION\tKIND\tHEALTH\tSHARDS\tSIDECARS\tLEASE")
	for _, u := range topo.Units {
		sc := strconv.Itoa(eps[u.Name])
		if down[u.Name] > 0 {
			sc += fmt.Sprintf(" (%d down)", down[u.Name])
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", u.Name, u.Region, dash(u.Kind), dash(health[u.Name]), owned[u.Name], sc, dash(lease[u.Name]))
	}
	tw.Flush()
	if !g.Enabled {
		fmt.Fprintf(stdout, "\ngossip: off on %s (HEALTH is unknown without it)\n", g.SeenBy)
		return exitOK
	}
	states := map[string]int{}
	for _, m := range g.Members {
		st := string(m.State)
		if !m.HeldUntil.IsZero() {
			st = "held"
		}
		states[st]++
	}
	var parts []string
	for _, st := range []string{"alive", "held", "dead", "left"} {
		if states[st] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", states[st], st))
		}
	}
	var regions []string
	for _, r := range g.Regions {
		regions = append(regions, r.Region+" "+string(r.State))
	}
	fmt.Fprintf(stdout, "\ngossip (as %s sees it): %d members (%s); regions: %s\n", g.SeenBy, len(g.Members), strings.Join(parts, ", "), strings.Join(regions, ", "))
	return exitOK
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func runShards(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("shards", "cellmesh shards [--unit U] [--region R] [--state S] [--api URL] [--token T] [--json]",
		`Lists the shard map: every shard's primary unit, region, epoch, state
and standbys (shard -1 is the global gzone writer), optionally only those
of one unit, region or state.`, stderr)
	f := addAPIFlags(fs)
	unit := fs.String("unit", "", "only the shards this unit owns")
	region := fs.String("region", "", "only the shards owned in this region")
	state := fs.String("state", "", "only shards in this state: serving, draining or blocked")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "shards", "unexpected argument %q", fs.Arg(0))
	}
	q := []string{}
	for _, p := range []struct{ k, v string }{{"unit", *unit}, {"region", *region}, {"state", *state}} {
		if p.v != "" {
			q = append(q, p.k+"="+urlEscape(p.v))
		}
	}
	path := "/v1/shards"
	if len(q) > 0 {
		path += "?" + strings.Join(q, "&")
	}
	var out controlplane.Shards
	raw, err := f.call("GET", path, nil, &out)
	if err != nil {
		return apiFail(stderr, "shards", err)
	}
	if f.json {
		printJSON(stdout, raw)
		return exitOK
	}
	sort.Slice(out.Shards, func(i, j int) bool { return out.Shards[i].Shard < out.Shards[j].Shard })
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHARD\tUNIT\tREGION\tEPOCH\tSTATE\tSTANDBYS")
	for _, s := range out.Shards {
		name := strconv.Itoa(s.Shard)
		if s.Shard < 0 {
			name = "global"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", name, s.Unit, s.Region, s.Epoch, s.State, dash(strings.Join(s.Standbys, ",")))
	}
	tw.Flush()
	fmt.Fprintf(stdout, "%d shards, map version %d\n", len(out.Shards), out.Version)
	return exitOK
}

func urlEscape(s string) string {
	r := strings.NewReplacer("%", "%25", "&", "%26", "=", "%3D", "+", "%2B", " ", "%20", "#", "%23", "?", "%3F")
	return r.Replace(s)
}

func runMove(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("move", "cellmesh move SHARD --to UNIT [--epoch E] [--accept-data-loss] [--api URL] [--token T] [--json]",
		`Moves a shard's primary to another unit with a planned handoff: the
control plane's leader checks the safety rules, drains the shard (its old
owner's sidecars hold new writes), waits until every handoff service's
standby in UNIT has applied all the primary committed, commits epoch+1
through raft (only if the shard is still at the epoch it read, or at
--epoch), pushes the new map to every sidecar over xDS, demotes the old
primary and promotes the new one; the held writes go on to it.

A standby that does not catch up in time blocks the handoff: the shard
stays on its primary, marked blocked, and the command exits 3 saying why.
--accept-data-loss moves it anyway and records the gap (the writes the
standby lacked) in the handoff. SHARD is a shard number or "global" (the
gzone writer). Exit 3 when the control plane refused the move (nothing
changed, or blocked).`, stderr)
	f := addAPIFlags(fs)
	to := fs.String("to", "", "the unit that becomes the primary (required)")
	epoch := fs.Uint64("epoch", 0, "move only if the shard is still at this epoch")
	acceptLoss := fs.Bool("accept-data-loss", false, "move even when the standby cannot be proven caught up; the gap is recorded")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() != 1 {
		return usagef(stderr, "move", "want exactly one SHARD")
	}
	shard := fs.Arg(0)
	if _, err := strconv.Atoi(shard); err != nil && shard != "global" {
		return usagef(stderr, "move", "SHARD %q: want a shard number or global", shard)
	}
	if *to == "" {
		return usagef(stderr, "move", "--to is required")
	}
	var res controlplane.MoveResult
	raw, err := f.call("POST", "/v1/shards/"+shard+"/move", controlplane.MoveRequest{To: *to, Epoch: *epoch, AcceptDataLoss: *acceptLoss}, &res)
	if err != nil {
		return apiFail(stderr, "move", err)
	}
	if f.json {
		printJSON(stdout, raw)
		return exitOK
	}
	fmt.Fprintf(stdout, "moved shard %s from %s to %s: epoch %d, map version %d (raft index %d, pushed)\n", shard, res.From, res.To, res.Epoch, res.Version, res.Index)
	if h := res.Handoff; h != nil && h.Gap > 0 {
		fmt.Fprintf(stdout, "DATA LOSS ACCEPTED: the standby lacked %d writes (%s); recorded in handoff %s\n", h.Gap, h.Reason, h.ID)
	}
	return exitOK
}
