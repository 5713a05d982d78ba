// funnelsync pages: the only script. Pickers marked data-autosubmit submit their form when they
// change; forms marked data-confirm ask first. Everything works without it.
document.addEventListener("change", function (event) {
  if (event.target.matches("[data-autosubmit]") && event.target.form) {
    event.target.form.submit();
  }
});
document.addEventListener("submit", function (event) {
  var message = event.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});
