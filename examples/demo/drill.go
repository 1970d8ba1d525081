package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
)

// DrillSpec is a drill the demo runs at a time of its run: KIND:TARGET@T,
// such as evacuate:eu@20s (TARGET a region or a unit of the demo).
type DrillSpec struct {
	Kind   string        `json:"kind"`
	Target string        `json:"target"`
	At     time.Duration `json:"at"`
}

// drillKinds are the drills the demo can schedule (the control plane's).
var drillKinds = []string{"evacuate", "restore"}

// ParseDrill reads KIND:TARGET@T.
func ParseDrill(s string) (DrillSpec, error) {
	kt, at, ok := strings.Cut(s, "@")
	kind, target, ok2 := strings.Cut(kt, ":")
	if !ok || !ok2 || kind == "" || target == "" {
		return DrillSpec{}, fmt.Errorf("drill %q: want KIND:TARGET@T, such as evacuate:eu@20s", s)
	}
	if !slices.Contains(drillKinds, kind) {
		return DrillSpec{}, fmt.Errorf("drill %q: kind %q: want one of %s", s, kind, strings.Join(drillKinds, ", "))
	}
	d, err := time.ParseDuration(at)
	if err != nil || d < 0 {
		return DrillSpec{}, fmt.Errorf("drill %q: time %q: want a duration from the load's start, such as 20s", s, at)
	}
	return DrillSpec{Kind: kind, Target: target, At: d}, nil
}

// checkDrills refuses drills whose target is not a region or unit of the
// demo, before anything starts.
func checkDrills(specs []DrillSpec, regions []string, units []string) error {
	for _, s := range specs {
		if !slices.Contains(regions, s.Target) && !slices.Contains(units, s.Target) {
			return fmt.Errorf("drill %s:%s: %q is not a region (%s) or unit (%s) of the demo", s.Kind, s.Target, s.Target,
				strings.Join(regions, ", "), strings.Join(units, ", "))
		}
	}
	return nil
}

// DrillResult is a scheduled drill and the control plane's report of it.
type DrillResult struct {
	Spec   DrillSpec       `json:"spec"`
	Phase  string          `json:"phase"`
	Error  string          `json:"error,omitempty"`
	Report json.RawMessage `json:"report,omitempty"`
}

// runDrill starts the drill at its time (from start), through the
// leader's API, and follows it to its end, printing its events.
func (d *Demo) runDrill(ctx context.Context, start time.Time, spec DrillSpec, progress io.Writer) DrillResult {
	res := DrillResult{Spec: spec, Phase: "not started"}
	select {
	case <-ctx.Done():
		res.Error = "the run ended before the drill's time"
		return res
	case <-time.After(time.Until(start.Add(spec.At))):
	}
	body := map[string]string{"kind": spec.Kind}
	if slices.Contains(d.report.Regions, spec.Target) {
		body["region"] = spec.Target
	} else {
		body["unit"] = spec.Target
	}
	var started struct {
		ID string `json:"id"`
	}
	if err := d.apiCall(ctx, "POST", "/v1/drills", body, &started); err != nil {
		res.Phase, res.Error = "refused", err.Error()
		fmt.Fprintf(progress, "drill %s:%s: %v\n", spec.Kind, spec.Target, err)
		return res
	}
	fmt.Fprintf(progress, "drill %s:%s started (%s)\n", spec.Kind, spec.Target, started.ID)
	seen := 0
	// The drill goes on past the load's end, but not forever: a control
	// plane that stops answering leaves it unknown.
	giveUp := time.Now().Add(10 * time.Minute)
	for time.Now().Before(giveUp) {
		var rep struct {
			Phase  string `json:"phase"`
			Events []struct {
				Msg string `json:"msg"`
			} `json:"events"`
		}
		raw, err := d.apiRaw(context.WithoutCancel(ctx), "GET", "/v1/drills/"+started.ID, nil)
		if err == nil && json.Unmarshal(raw, &rep) == nil {
			for _, e := range rep.Events[min(seen, len(rep.Events)):] {
				fmt.Fprintf(progress, "drill %s: %s\n", started.ID, e.Msg)
			}
			seen = len(rep.Events)
			if rep.Phase != "running" {
				res.Phase, res.Report = rep.Phase, raw
				return res
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	res.Phase, res.Error = "unknown", "the control plane did not report the drill's end within 10 minutes"
	return res
}

// apiCall sends a call to the leader's API and decodes its answer.
func (d *Demo) apiCall(ctx context.Context, method, path string, body, out any) error {
	raw, err := d.apiRaw(ctx, method, path, body)
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, out)
}

// apiRaw sends a call to the leader's API and returns its answer's body.
func (d *Demo) apiRaw(ctx context.Context, method, path string, body any) ([]byte, error) {
	return d.apiAt(ctx, d.leaderAPI(), method, path, body)
}

// apiAt sends a call to the API at addr; an answer other than 200 is an
// error saying the API's error.
func (d *Demo) apiAt(ctx context.Context, addr, method, path string, body any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+d.token)
	resp, err := apiClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		_ = json.Unmarshal(raw, &e)
		return nil, fmt.Errorf("HTTP %d: %s", resp.StatusCode, e.Error)
	}
	return raw, nil
}
