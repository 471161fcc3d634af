package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// unreachable wraps an error of a registry call with what the user needs:
// which registry, and how long we waited.
func unreachable(rawURL string, timeout time.Duration, err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("no answer from %s within %v (is the registry running and reachable?): %w", registry.Redact(rawURL), timeout, err)
	}
	return fmt.Errorf("%s: %w", registry.Redact(rawURL), err)
}

func (c *cli) ls(ctx context.Context, args []string) error {
	fs := c.newFlagSet("ls", "ls URL [SERVICE] [--timeout 5s] [--json]")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the registry")
	asJSON := fs.Bool("json", false, "print a JSON array of instances (of services and their counts without SERVICE)")
	pos, err := c.parse(fs, args, "URL", "[SERVICE]")
	if err != nil {
		return err
	}
	if len(pos) == 1 {
		return c.lsServices(ctx, pos[0], *timeout, *asJSON)
	}
	rawURL, service := pos[0], pos[1]
	r, err := c.open(ctx, "ls", rawURL, service)
	if err != nil {
		return err
	}
	defer r.Close()
	lctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	list, err := r.Lookup(lctx, service)
	if err != nil {
		return unreachable(rawURL, *timeout, err)
	}
	if *asJSON {
		return c.printJSON(jsonInstances(list), "  ")
	}
	if len(list) == 0 {
		fmt.Fprintf(c.stderr, "no instances of %s\n", service)
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDR\tMETADATA")
	for _, in := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", in.ID, in.Addr, formatMeta(in.Metadata))
	}
	return tw.Flush()
}

func formatMeta(md map[string]string) string {
	keys := slices.Sorted(maps.Keys(md))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + md[k]
	}
	return strings.Join(parts, " ")
}

func stamp() string { return time.Now().Format("15:04:05.000") }

func (c *cli) watch(ctx context.Context, args []string) error {
	fs := c.newFlagSet("watch", "watch URL SERVICE [--json]")
	asJSON := fs.Bool("json", false, "print one JSON object per update, a line each")
	pos, err := c.parse(fs, args, "URL", "SERVICE")
	if err != nil {
		return err
	}
	rawURL, service := pos[0], pos[1]
	r, err := c.open(ctx, "watch", rawURL, service)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := r.Watch(ctx, service)
	if err != nil {
		return err
	}
	defer w.Close()
	header := c.stdout
	if *asJSON {
		header = c.stderr // stdout has JSON only
	}
	fmt.Fprintf(header, "%s watching %s in %s (Ctrl-C to stop)\n", stamp(), service, registry.Redact(rawURL))
	first, stale := true, false
	for {
		u, err := w.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil // interrupted: a normal end
			}
			return err
		}
		if *asJSON {
			if err := c.printJSON(jsonUpdateOf(time.Now(), u), ""); err != nil {
				return err
			}
			continue
		}
		now := stamp()
		if !u.Synced {
			fmt.Fprintf(c.stdout, "%s STALE registry unreachable, nothing known yet: %v\n", now, u.Err)
			stale = true
			continue
		}
		if first {
			fmt.Fprintf(c.stdout, "%s synced: %d instance(s)\n", now, len(u.Added))
			first = false
		}
		for _, in := range u.Removed {
			fmt.Fprintf(c.stdout, "%s - %s %s\n", now, in.ID, in.Addr)
		}
		for _, in := range u.Added {
			fmt.Fprintf(c.stdout, "%s + %s %s %s\n", now, in.ID, in.Addr, formatMeta(in.Metadata))
		}
		for _, in := range u.Changed {
			fmt.Fprintf(c.stdout, "%s ~ %s %s %s\n", now, in.ID, in.Addr, formatMeta(in.Metadata))
		}
		switch {
		case u.Stale && !stale:
			fmt.Fprintf(c.stdout, "%s STALE registry unreachable; keeping the last list of %d instance(s): %v\n", now, len(u.Instances()), u.Err)
		case !u.Stale && stale:
			fmt.Fprintf(c.stdout, "%s FRESH registry reachable again; %d instance(s)\n", now, len(u.Instances()))
		}
		stale = u.Stale
	}
}

// metaFlag collects repeated --meta k=v.
type metaFlag map[string]string

func (m metaFlag) String() string { return formatMeta(m) }
func (m metaFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not k=v", s)
	}
	m[k] = v
	return nil
}

func (c *cli) register(ctx context.Context, args []string) error {
	fs := c.newFlagSet("register", "register URL SERVICE ADDR [--id ID] [--meta k=v]... [--ttl 10s] [--timeout 5s] [--json]")
	id := fs.String("id", "", "instance ID (default: ADDR)")
	meta := metaFlag{}
	fs.Var(meta, "meta", "metadata `k=v`; repeat for more (weight, zone and version are conventional keys)")
	ttl := fs.Duration("ttl", 0, "lease TTL; sets the URL's ttl parameter (default: the URL's, or 10s)")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the first registration and for the deregistration")
	asJSON := fs.Bool("json", false, "print one JSON object per state change, a line each")
	pos, err := c.parse(fs, args, "URL", "SERVICE", "ADDR")
	if err != nil {
		return err
	}
	rawURL, service, addr := pos[0], pos[1], pos[2]
	ttlSet := false
	fs.Visit(func(f *flag.Flag) { ttlSet = ttlSet || f.Name == "ttl" })
	if ttlSet {
		if rawURL, err = withTTL(rawURL, *ttl); err != nil {
			return err
		}
	}
	inst := registry.Instance{Service: service, ID: *id, Addr: addr, Metadata: meta}
	if err := inst.Validate(); err != nil {
		return err
	}
	r, err := c.open(ctx, "register", rawURL, service)
	if err != nil {
		return err
	}
	defer r.Close()
	if len(rawURL) > 4 && strings.EqualFold(rawURL[:4], "mem:") {
		fmt.Fprintln(c.stderr, "rollcall register: warning: a mem:// registry lives only in this process; no other command or process sees this registration")
	}
	// say reports a state change, as text or as a JSON object.
	say := func(event string, err error, text string) {
		if !*asJSON {
			fmt.Fprintf(c.stdout, "%s %s\n", stamp(), text)
			return
		}
		ev := jsonEvent{Time: time.Now(), Event: event, Service: inst.Service, ID: inst.ID, Addr: inst.Addr, Registry: registry.Redact(rawURL)}
		if err != nil {
			ev.Error = err.Error()
		}
		_ = c.printJSON(ev, "")
	}
	rctx, cancel := context.WithTimeout(ctx, *timeout)
	rr, err := r.Register(rctx, inst)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil // interrupted before anything was registered
		}
		return unreachable(rawURL, *timeout, err)
	}
	inst = rr.Instance()
	say("registered", nil, fmt.Sprintf("registered %s/%s at %s in %s; Ctrl-C deregisters", inst.Service, inst.ID, inst.Addr, registry.Redact(rawURL)))

	// Report the supervisor's state changes until interrupted.
	last := rr.Status()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
		st := rr.Status()
		lost := st.State == registry.Retrying && last.State != registry.Retrying
		again := st.Reregistrations > last.Reregistrations
		if lost || again && last.State != registry.Retrying {
			// A loss and its repair can both fall between two looks.
			why := ""
			if st.Err != nil {
				why = fmt.Sprintf(" (%v)", st.Err)
			}
			say("lost", st.Err, "LOST registration lost"+why+"; registering again")
		}
		if again {
			say("registered-again", nil, "registered again")
		}
		last = st
	}
	dctx, dcancel := context.WithTimeout(context.Background(), *timeout)
	defer dcancel()
	if err := rr.Deregister(dctx); err != nil {
		return fmt.Errorf("deregistering %s/%s: %w", inst.Service, inst.ID, unreachable(rawURL, *timeout, err))
	}
	say("deregistered", nil, fmt.Sprintf("deregistered %s/%s", inst.Service, inst.ID))
	return nil
}

// withTTL sets the ttl query parameter of rawURL; giving it in both places
// is a usage error.
func withTTL(rawURL string, ttl time.Duration) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("%w: %q does not parse", registry.ErrInvalidURL, registry.Redact(rawURL))
	}
	q := u.Query()
	if q.Has("ttl") {
		return "", usagef("register: --ttl and the URL's ttl parameter both given")
	}
	if ttl <= 0 {
		return "", usagef("register: --ttl must be positive (leave it out for the default)")
	}
	q.Set("ttl", ttl.String())
	u.RawQuery = q.Encode()
	return u.String(), nil
}

var _ flag.Value = metaFlag{}
