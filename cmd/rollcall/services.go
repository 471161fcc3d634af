package main

import (
	"context"
	"fmt"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// lsServices is `ls URL`: the services of the registry, sorted by name, with
// the number of live instances Lookup finds in each.
func (c *cli) lsServices(ctx context.Context, rawURL string, timeout time.Duration, asJSON bool) error {
	r, err := c.open(ctx, "ls", rawURL, "")
	if err != nil {
		return err
	}
	defer r.Close()
	lctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	names, err := r.Services(lctx)
	if err != nil {
		return unreachable(rawURL, timeout, err)
	}
	out := make([]jsonService, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8) // a few lookups at a time
	for i, name := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			list, err := r.Lookup(lctx, name)
			out[i], errs[i] = jsonService{Service: name, Instances: len(list)}, err
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return unreachable(rawURL, timeout, err)
		}
	}
	if asJSON {
		return c.printJSON(out, "  ")
	}
	if len(out) == 0 {
		fmt.Fprintf(c.stderr, "no services in %s\n", registry.Redact(rawURL))
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tINSTANCES")
	for _, s := range out {
		fmt.Fprintf(tw, "%s\t%d\n", s.Service, s.Instances)
	}
	return tw.Flush()
}
