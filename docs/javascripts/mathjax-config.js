// MathJax configuration for pymdownx.arithmatex (generic mode): typeset only the .arithmatex spans and blocks.
// MathJax itself is served from the site (javascripts/mathjax/), so formulas render offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
    enableMenu: false,
  },
};

if (typeof document$ !== "undefined") {
  // mkdocs-material instant navigation: typeset again after each page change.
  document$.subscribe(() => {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  });
}
