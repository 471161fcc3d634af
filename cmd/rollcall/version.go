package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// buildVersion returns the module version the binary was built at ("(devel)"
// when not stamped, as in a build from a checkout) and its VCS revision if
// the build recorded one.
func buildVersion() (version, revision string) {
	version = "(devel)"
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return version, ""
	}
	if v := bi.Main.Version; v != "" {
		version = v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			revision = s.Value
		}
		if s.Key == "vcs.modified" && s.Value == "true" && revision != "" {
			revision += "+dirty"
		}
	}
	return version, revision
}

func (c *cli) version(args []string) error {
	fs := c.newFlagSet("version", "version [--json]")
	asJSON := fs.Bool("json", false, "print a JSON object")
	if _, err := c.parse(fs, args); err != nil {
		return err
	}
	v, rev := buildVersion()
	if *asJSON {
		return c.printJSON(struct {
			Version  string `json:"version"`
			Revision string `json:"revision,omitempty"`
			Go       string `json:"go"`
			Platform string `json:"platform"`
		}{v, rev, runtime.Version(), runtime.GOOS + "/" + runtime.GOARCH}, "  ")
	}
	if rev != "" {
		v += " " + rev
	}
	fmt.Fprintf(c.stdout, "rollcall %s %s %s/%s\n", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}
